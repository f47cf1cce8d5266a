//! Reading JSON objects the way Go's `encoding/json` fills a struct: keys match field
//! names case-insensitively and the last matching key wins. flanneld's config and
//! lease values are written by hand and by Go, so both spellings occur in the field.

use serde_json::{Map, Value};

/// The value of field `name` in `obj`, Go-style. `null` reads as absent (Go leaves
/// the field at its zero value).
pub fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .next_back()
        .filter(|v| !v.is_null())
}

/// A string field, or an error naming the field.
pub fn string<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{name}: expected a string, got {other}")),
    }
}

/// A boolean field.
pub fn boolean(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(format!("{name}: expected true or false, got {other}")),
    }
}

/// A non-negative integer field (Go `uint`).
pub fn unsigned(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, String> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{name}: expected a non-negative integer, got {v}")),
    }
}

/// Parse `text` as a JSON object.
pub fn object(text: &[u8], what: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("{what} must be a JSON object, got {other}")),
        Err(e) => Err(format!("{what} is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_case_insensitively_and_the_last_wins() {
        let obj = object(br#"{"Network":"a","network":"b","VNI":1,"x":null}"#, "t").unwrap();
        assert_eq!(string(&obj, "NETWORK").unwrap(), Some("b"));
        assert_eq!(unsigned(&obj, "vni").unwrap(), Some(1));
        assert_eq!(field(&obj, "x"), None);
        assert!(
            unsigned(&obj, "Network")
                .unwrap_err()
                .contains("non-negative")
        );
        assert!(
            object(b"[1]", "config")
                .unwrap_err()
                .contains("JSON object")
        );
    }
}
