//! The one door to JSON: every module that reads or writes JSON goes through here, and
//! this is the only module that names `serde_json` (each external crate is imported by one
//! module). It reads text into any `Deserialize` type or a [`Value`], builds values with
//! [`json!`], and renders a value as compact JSON on one line.

pub use serde_json::{Value, json};

/// `text` read as a `T`; the error says what is wrong and where (line and column).
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// `value` as compact JSON: one line, no trailing newline (a string's newlines are escaped).
pub fn render(value: &Value) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_value_is_one_line_that_parses_back_to_it() {
        let value = json!({"text": "two\nlines", "n": 3, "none": null, "list": [1.5, true]});
        let text = render(&value);
        assert!(!text.contains('\n'), "{text}");
        assert_eq!(parse::<Value>(&text), Ok(value));
    }

    #[test]
    fn text_that_is_not_json_says_where() {
        let e = parse::<Value>("{\"n\": }").expect_err("not JSON");
        assert!(e.contains("line 1 column 7"), "{e}");
    }
}
