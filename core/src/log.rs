//! A tiny logger for plugins. stdout belongs to the CNI result, so logs go to stderr
//! (which runtimes capture) or to a file named by `WEFT_LOG_FILE`; the level comes
//! from `WEFT_LOG` (error, warn, info, debug; default warn).

use std::io::Write;
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
    if let Ok(mut sink) = l.sink.lock() {
        let _ = writeln!(sink, "{plugin} [{}] {level:?}: {args}", std::process::id());
    }
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
