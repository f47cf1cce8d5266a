//! A tiny logger for plugins. stdout belongs to the CNI result, so logs go to stderr
//! (which runtimes capture) or to a file named by `WEFT_LOG_FILE` (created 0600);
//! the level comes from `WEFT_LOG` (error, warn, info, debug; default warn).
//!
//! One message is one line: control characters in it (a line break in a container
//! ID, a network name or an error from another program) are written escaped, so
//! what a caller passes in cannot forge log lines or terminal escapes.

use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

struct Logger {
    level: Level,
    sink: Mutex<Box<dyn Write + Send>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Set up logging from the environment; later calls are no-ops.
pub fn init_from_env(plugin: &'static str) {
    let level = match std::env::var("WEFT_LOG")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "error" => Level::Error,
        "info" => Level::Info,
        "debug" => Level::Debug,
        _ => Level::Warn,
    };
    let file = std::env::var_os("WEFT_LOG_FILE").and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(p)
            .ok()
    });
    let sink: Box<dyn Write + Send> = match file {
        Some(f) => Box::new(f),
        None => Box::new(std::io::stderr()),
    };
    let _ = LOGGER.set(Logger {
        level,
        sink: Mutex::new(sink),
    });
    let _ = PLUGIN.set(plugin);
}

static PLUGIN: OnceLock<&'static str> = OnceLock::new();

/// Write one line if `level` is enabled. Use the [`crate::warn!`] family of macros.
pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    let Some(l) = LOGGER.get() else { return };
    if level > l.level {
        return;
    }
    let plugin = PLUGIN.get().copied().unwrap_or("weft");
    let line = format!(
        "{plugin} [{}] {level:?}: {}\n",
        std::process::id(),
        escape_controls(&args.to_string())
    );
    if let Ok(mut sink) = l.sink.lock() {
        // One write per line: concurrent plugins appending to one file do not interleave.
        let _ = sink.write_all(line.as_bytes());
    }
}

/// `text` with every control character and Unicode line or paragraph separator
/// escaped (`\n`, `\r`, `\t`, `\u{1b}`, `\u{2028}`, …) and everything else,
/// backslashes included, as given.
fn escape_controls(text: &str) -> String {
    let unsafe_char = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !text.chars().any(unsafe_char) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($t)*)) };
}

#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) };
}

#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { $crate::log::write($crate::log::Level::Debug, format_args!($($t)*)) };
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_cannot_start_a_line() {
        assert_eq!(escape_controls("plain: a/b c"), "plain: a/b c");
        assert_eq!(
            escape_controls("id\nhost-local [1] Error: forged\r\t\u{1b}[2J\0"),
            "id\\nhost-local [1] Error: forged\\r\\t\\u{1b}[2J\\u{0}"
        );
        assert_eq!(escape_controls("\u{85}é\u{2028}x"), "\\u{85}é\\u{2028}x");
    }
}
