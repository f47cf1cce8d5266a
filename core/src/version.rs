//! CNI spec versions: which ones we speak and how they compare.

use crate::error::{CniError, code};
use std::cmp::Ordering;

/// Every spec version weft implements, oldest first.
pub const SUPPORTED: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The newest version; what VERSION answers when stdin names none.
pub const CURRENT: &str = "1.1.0";

/// Parse `MAJOR.MINOR.PATCH` into a comparable triple.
pub fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let triple = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(triple)
}

/// Compare two version strings; unparsable ones sort first.
pub fn cmp(a: &str, b: &str) -> Ordering {
    parse(a).cmp(&parse(b))
}

/// `a >= b`.
pub fn at_least(a: &str, b: &str) -> bool {
    cmp(a, b) != Ordering::Less
}

/// The config version if we support it, else the spec's code 1.
pub fn require_supported(v: &str) -> Result<&'static str, CniError> {
    SUPPORTED.iter().copied().find(|s| *s == v).ok_or_else(|| {
        let list: Vec<String> = SUPPORTED.iter().map(|s| format!("{s:?}")).collect();
        CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(
            format!("config is {v:?}, plugin supports [{}]", list.join(" ")),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering() {
        assert!(at_least("1.1.0", "1.0.0"));
        assert!(at_least("0.4.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(at_least("0.10.0", "0.9.0"));
        assert_eq!(parse("1.0"), None);
        assert_eq!(parse("1.0.0.0"), None);
        assert_eq!(parse("abc"), None);
    }

    #[test]
    fn unsupported_is_code_1() {
        let e = require_supported("9.9.9").unwrap_err();
        assert_eq!(e.code, 1);
        assert_eq!(
            e.details,
            r#"config is "9.9.9", plugin supports ["0.1.0" "0.2.0" "0.3.0" "0.3.1" "0.4.0" "1.0.0" "1.1.0"]"#
        );
        assert_eq!(require_supported("1.1.0").unwrap(), "1.1.0");
    }
}
