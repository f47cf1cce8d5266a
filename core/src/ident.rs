//! Recognising weft's own plugin binaries on CNI_PATH.
//!
//! Each weft plugin binary carries a short text ("weft host-local 0.1.0") in an ELF
//! section of its own. A plugin that links another one as a library (bridge links
//! host-local) reads that section from the binary it is about to exec: when the text
//! matches, the binary *is* that library at the same version, and running it
//! in-process saves an exec (~1 ms) with exactly the same behaviour. Any other
//! binary of that name (the reference plugin, another version) is exec'd as usual.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The ELF section holding the identity text.
pub const SECTION: &str = ".weft_ident";

/// Put `$text` (a `&'static str` constant) into the binary's identity section. Call it
/// once from `main`: the reference to the static keeps the linker from dropping it.
#[macro_export]
macro_rules! embed_ident {
    ($text:expr) => {{
        const TEXT: &str = $text;
        #[unsafe(link_section = ".weft_ident")]
        static IDENT: [u8; TEXT.len()] = $crate::ident::bytes(TEXT);
        ::std::hint::black_box(&IDENT);
    }};
}

/// `s` as a byte array, for [`embed_ident`].
pub const fn bytes<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = b[i];
        i += 1;
    }
    out
}

/// Whether the binary at `path` carries exactly `text` as its identity.
pub fn matches(path: &Path, text: &str) -> bool {
    read(path).is_some_and(|found| found == text.as_bytes())
}

/// The identity section of the ELF file at `path`, if it has one. Reads the ELF
/// header, the section headers and the section-name table (a few KiB), never the
/// whole binary. Anything unexpected (not ELF64 little-endian, truncated) is `None`.
pub fn read(path: &Path) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    let at = |off: u64, len: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off).ok()?;
        Some(buf)
    };
    let hdr = at(0, 64)?;
    // ELF magic, 64-bit class, little-endian data.
    if hdr[..4] != *b"\x7fELF" || hdr[4] != 2 || hdr[5] != 1 {
        return None;
    }
    let shoff = u64_at(&hdr, 0x28);
    let shentsize = usize::from(u16_at(&hdr, 0x3a));
    let shnum = usize::from(u16_at(&hdr, 0x3c));
    let shstrndx = usize::from(u16_at(&hdr, 0x3e));
    if shentsize < 64 || shnum == 0 || shstrndx >= shnum || shnum > 4096 {
        return None;
    }
    let table = at(shoff, shentsize * shnum)?;
    let section = |i: usize| &table[i * shentsize..i * shentsize + 64];
    // A section header: name offset at 0, file offset at 0x18, size at 0x20.
    let strtab = section(shstrndx);
    let names = at(
        u64_at(strtab, 0x18),
        usize::try_from(u64_at(strtab, 0x20)).ok()?,
    )?;
    let wanted = SECTION.as_bytes();
    (0..shnum).map(section).find_map(|sh| {
        let name = names.get(usize::try_from(u32_at(sh, 0)).ok()?..)?;
        if !name.starts_with(wanted) || name.get(wanted.len()) != Some(&0) {
            return None;
        }
        let size = usize::try_from(u64_at(sh, 0x20)).ok()?;
        (size <= 256).then(|| at(u64_at(sh, 0x18), size))?
    })
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("two bytes"))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("four bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("eight bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_copies_the_text() {
        const T: &str = "weft x 1.0";
        let b: [u8; T.len()] = bytes(T);
        assert_eq!(&b, T.as_bytes());
    }

    #[test]
    fn non_elf_and_missing_files_have_no_identity() {
        let dir = std::env::temp_dir().join(format!("weft-ident-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("script");
        std::fs::write(&script, "#!/bin/sh\ntrue\n").unwrap();
        assert_eq!(read(&script), None);
        assert_eq!(read(&dir.join("absent")), None);
        let short = dir.join("short");
        std::fs::write(&short, b"\x7fELF\x02\x01").unwrap();
        assert_eq!(read(&short), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_elf_without_the_section_has_no_identity() {
        // /bin/sh is an ELF64 binary on every machine this runs on.
        assert_eq!(read(Path::new("/bin/sh")), None);
        assert!(!matches(Path::new("/bin/sh"), "weft host-local"));
    }
}
