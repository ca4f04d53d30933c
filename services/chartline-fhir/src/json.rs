//! JSON parsing with the limits a public endpoint needs.

use serde::de::DeserializeSeed as _;

use crate::error::{FhirError, IssueCode};
use crate::tree::{Json, Stacks, TreeSeed};

/// Bounds on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted payload in bytes (HTTP answers 413 past it).
    pub max_bytes: usize,
    /// Deepest accepted nesting of objects and arrays (above 127, the parser's own bound
    /// of 127 levels applies).
    pub max_depth: usize,
    /// Longest accepted string value in bytes (FHIR: 1 MB for most strings; attachments excepted).
    pub max_string_bytes: usize,
    /// Reject strings that hold HTML tags (the reference validator's `security-checks`).
    /// Off by default: clinical free text legitimately contains `<`.
    pub reject_html_in_strings: bool,
    /// Threads that validate the entries of one large Bundle together; 0 (the default):
    /// as many as the machine has cores. Not a bound on input: a setting of the work.
    pub validation_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 * 1024 * 1024,
            max_depth: 64,
            max_string_bytes: 1024 * 1024,
            reject_html_in_strings: false,
            validation_threads: 0,
        }
    }
}

/// Parses one JSON document within `limits`. Errors say where (line, column), not what.
///
/// The tree is a [`Json`]. The nesting bound is enforced while the tree is built: the
/// parser stops at the first object or array past `max_depth` levels, before recursing into
/// it. The text is checked as UTF-8 once, up front, instead of string by string.
pub fn parse_json(bytes: &[u8], limits: &Limits) -> Result<Json, FhirError> {
    if bytes.len() > limits.max_bytes {
        return Err(FhirError::new(
            IssueCode::TooLong,
            format!("payload of {} bytes is over the limit of {} bytes", bytes.len(), limits.max_bytes),
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let before = &bytes[..e.valid_up_to()];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.len() - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
            return Err(malformed(format!("malformed JSON at line {line} column {column}: text is not UTF-8")));
        }
    };
    let too_deep = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let stacks = Stacks::default();
    let seed = TreeSeed { depth: 0, max_depth: limits.max_depth, too_deep: &too_deep, stacks: &stacks };
    let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if too_deep.get() => Err(nested_too_deep(limits.max_depth)),
        // serde_json's own bound, for limits configured above it.
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => Err(nested_too_deep(limits.max_depth)),
        Err(e) => Err(malformed(format!("malformed JSON at line {} column {}: {}", e.line(), e.column(), json_error_kind(&e)))),
    }
}

/// serde_json refuses the 128th level of nesting, before our visitor sees it, whatever we
/// configure.
const PARSER_MAX_DEPTH: usize = 127;

fn nested_too_deep(configured: usize) -> FhirError {
    let message = if configured > PARSER_MAX_DEPTH {
        format!("JSON is nested deeper than {PARSER_MAX_DEPTH} levels, the most the parser accepts (the configured limit is {configured})")
    } else {
        format!("JSON is nested deeper than the configured limit of {configured} levels")
    };
    FhirError::new(IssueCode::TooCostly, message)
}

fn malformed(message: String) -> FhirError {
    let mut err = FhirError::new(IssueCode::Invalid, message);
    err.issues[0].severity = crate::Severity::Fatal;
    err
}

fn json_error_kind(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected data",
        Category::Eof => "unexpected end of input",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_rejected_before_parsing() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let err = parse_json(deep.as_bytes(), &Limits::default()).unwrap_err();
        assert_eq!(err.code(), IssueCode::TooCostly);
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let s = format!(r#"{{"a": "{}\"{}"}}"#, "[".repeat(100), "{".repeat(100));
        assert!(parse_json(s.as_bytes(), &Limits::default()).is_ok());
    }

    #[test]
    fn escapes_are_skipped_with_the_byte_they_escape() {
        let limits = Limits { max_depth: 2, ..Limits::default() };
        // An escaped quote does not end the string; an escaped backslash does not escape the quote.
        assert!(parse_json(br#"{"a": "\"[[[[", "b": "x\\\\"}"#, &limits).is_ok());
        assert_eq!(parse_json(br#"{"a": "x\\\\", "b": [[1]]}"#, &limits).unwrap_err().code(), IssueCode::TooCostly);
        assert!(parse_json(br#"{"a": "\\"}"#, &Limits { max_depth: 1, ..limits }).is_ok());
        assert_eq!(parse_json(b"[[", &Limits { max_depth: 1, ..limits }).unwrap_err().code(), IssueCode::TooCostly);
        // A string cut off after a backslash is malformed, not too deep.
        assert_eq!(parse_json(b"[\"abc\\", &Limits { max_depth: 1, ..limits }).unwrap_err().code(), IssueCode::Invalid);
    }

    #[test]
    fn nesting_is_bounded_while_parsing_at_exactly_the_configured_depth() {
        let limits = Limits { max_depth: 3, ..Limits::default() };
        assert!(parse_json(b"[[[1]]]", &limits).is_ok());
        assert!(parse_json(br#"{"a": {"b": [1, {}]}}"#, &Limits { max_depth: 4, ..limits }).is_ok());
        for deep in [&b"[[[[1]]]]"[..], br#"{"a": {"b": [1, {}]}}"#, br#"[{"a": [{}]}]"#] {
            let err = parse_json(deep, &limits).unwrap_err();
            assert_eq!(err.code(), IssueCode::TooCostly, "{}", String::from_utf8_lossy(deep));
        }
    }

    #[test]
    fn a_bound_above_the_parsers_own_is_still_a_nesting_error() {
        // serde_json refuses the 128th level whatever the configuration says; the outcome says so.
        let limits = Limits { max_depth: 10_000, ..Limits::default() };
        let nested = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let err = parse_json(nested(128).as_bytes(), &limits).unwrap_err();
        assert_eq!(err.code(), IssueCode::TooCostly);
        assert!(err.issues[0].diagnostics.contains("127 levels, the most the parser accepts"), "{}", err.issues[0].diagnostics);
        assert!(parse_json(nested(127).as_bytes(), &limits).is_ok());
    }

    #[test]
    fn serde_jsons_raw_value_key_is_an_ordinary_key() {
        // serde_json's own visitor would parse the string as embedded JSON (unbounded).
        let sneaky = br#"{"$serde_json::private::RawValue": "[[[[1]]]]"}"#;
        let v = parse_json(sneaky, &Limits { max_depth: 2, ..Limits::default() }).unwrap();
        assert_eq!(v["$serde_json::private::RawValue"], "[[[[1]]]]");
    }

    #[test]
    fn text_that_is_not_utf8_is_malformed_with_its_position() {
        let err = parse_json(b"{\n  \"a\": \"caf\xe9\"\n}", &Limits::default()).unwrap_err();
        assert_eq!(err.code(), IssueCode::Invalid);
        assert!(err.issues[0].diagnostics.contains("line 2 column 12"), "{}", err.issues[0].diagnostics);
    }

    #[test]
    fn the_tree_is_the_one_serde_json_builds() {
        // Numbers of every kind, escapes, duplicate keys (the last wins in both), nulls.
        let odd = br#"{"i": -12, "u": 18446744073709551615, "f": 1.5e-7, "z": -0.0, "s": "a\u00e9\n\"",
            "d": 1, "d": 2, "n": null, "b": [true, false, [], {}], "big": 1e308}"#;
        assert_eq!(parse_json(odd, &Limits::default()).unwrap(), Json::from(serde_json::from_slice::<serde_json::Value>(odd).unwrap()));
        let mut files: Vec<_> = std::fs::read_dir(crate::test_fixtures().join("synthea/blaze-synthea-2.7.0")).into_iter().flatten().flatten().map(|e| e.path()).collect();
        files.sort();
        let mut compared = 0;
        for f in files.iter().take(3) {
            let bytes = std::fs::read(f).unwrap();
            let tree = parse_json(&bytes, &Limits::default()).unwrap();
            let reference = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap();
            assert_eq!(tree, Json::from(reference.clone()));
            assert_eq!(tree.to_json_string(), reference.to_string(), "the same compact text");
            compared += 1;
        }
        assert_eq!(compared, 3);
    }

    #[test]
    fn oversized_payload_is_too_long() {
        let limits = Limits { max_bytes: 10, ..Limits::default() };
        let err = parse_json(br#"{"resourceType":"Patient"}"#, &limits).unwrap_err();
        assert_eq!(err.code(), IssueCode::TooLong);
        assert_eq!(err.http_status(), 413);
    }

    #[test]
    fn malformed_json_names_the_position_not_the_content() {
        let err = parse_json(b"{\"name\": \"secret\",}", &Limits::default()).unwrap_err();
        assert_eq!(err.code(), IssueCode::Invalid);
        assert!(!err.issues[0].diagnostics.contains("secret"));
        assert!(err.issues[0].diagnostics.contains("line 1"));
    }
}
