//! JSON parsing with the limits a public endpoint needs.

use serde_json::Value;

use crate::error::{FhirError, IssueCode};

/// Bounds on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted payload in bytes (HTTP answers 413 past it).
    pub max_bytes: usize,
    /// Deepest accepted nesting of objects and arrays.
    pub max_depth: usize,
    /// Longest accepted string value in bytes (FHIR: 1 MB for most strings; attachments excepted).
    pub max_string_bytes: usize,
    /// Reject strings that hold HTML tags (the reference validator's `security-checks`).
    /// Off by default: clinical free text legitimately contains `<`.
    pub reject_html_in_strings: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bytes: 64 * 1024 * 1024, max_depth: 64, max_string_bytes: 1024 * 1024, reject_html_in_strings: false }
    }
}

/// Rejects JSON nested deeper than `max_depth` before any parser recurses into it.
/// A byte scan: brackets counted, strings (with escapes) skipped with `memchr`, which
/// matters for base64 attachments (most of a clinical note's bytes).
pub fn check_depth(bytes: &[u8], max_depth: usize) -> Result<(), FhirError> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                // To the closing quote; a backslash escapes the byte after it.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &bytes[i.min(bytes.len())..]) {
                        // Unterminated: the parser reports it.
                        None => return Ok(()),
                        Some(j) if bytes[i + j] == b'\\' => i += j + 2,
                        Some(j) => {
                            i += j + 1;
                            break;
                        }
                    }
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(FhirError::new(
                        IssueCode::TooCostly,
                        format!("JSON is nested deeper than the configured limit of {max_depth} levels"),
                    ));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Parses one JSON document within `limits`. Errors say where (line, column), not what.
pub fn parse_json(bytes: &[u8], limits: &Limits) -> Result<Value, FhirError> {
    if bytes.len() > limits.max_bytes {
        return Err(FhirError::new(
            IssueCode::TooLong,
            format!("payload of {} bytes is over the limit of {} bytes", bytes.len(), limits.max_bytes),
        ));
    }
    check_depth(bytes, limits.max_depth)?;
    serde_json::from_slice(bytes).map_err(|e| {
        let mut err = FhirError::new(
            IssueCode::Invalid,
            format!("malformed JSON at line {} column {}: {}", e.line(), e.column(), json_error_kind(&e)),
        );
        err.issues[0].severity = crate::Severity::Fatal;
        err
    })
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
        assert!(check_depth(br#"{"a": "x\\\\", "b": [[1]]}"#, 2).is_err());
        assert!(check_depth(br#"{"a": "\\"}"#, 1).is_ok());
        // A string cut off after a backslash is left to the parser.
        assert!(check_depth(b"[\"abc\\", 1).is_ok());
        assert!(check_depth(b"[[", 1).is_err());
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
