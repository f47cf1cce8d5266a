//! Ethernet addresses as text: `0a:58:0a:01:00:ff`, the form of Go's
//! `net.HardwareAddr.String`, CNI results, iproute2 and nft listings.

/// Six colon-separated pairs of hex digits (either case); anything else is None.
pub fn parse(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        // Hex digits only: from_str_radix takes a sign ("+a"), Go's ParseMAC does not.
        (p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Lower-case, colon-separated.
pub fn format(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse("0a:58:0A:01:00:ff"),
            Some([0x0a, 0x58, 0x0a, 0x01, 0x00, 0xff])
        );
        assert_eq!(parse("02:00:0a:00:00:ff"), Some([2, 0, 10, 0, 0, 255]));
        for bad in [
            "zz:zz",
            "0a:58:0a:01:00",
            "0a:58:0a:01:00:ff:00",
            "0a-58-0a-01-00-ff",
            "a:58:0a:01:00:ff",
            "02:00:0a:00:00",
            "02:00:0a:00:00:00:01",
            "+a:58:0a:01:00:05",
            "0a:58:0a:01:00:-5",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(format(&[0x0a, 0, 0xff, 1, 2, 3]), "0a:00:ff:01:02:03");
    }
}
