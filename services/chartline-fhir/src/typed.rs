//! The typed layer: `fhir-sdk`'s R4B models as a structural validator.
//!
//! R4B's models parse R4 clinical JSON but are lossy: an unknown element, or a choice
//! element (`value[x]`) whose value does not fit its type, is dropped silently. So the
//! check is a round trip: parse, serialize, and compare with what was sent; anything
//! that did not survive is an unknown element or an invalid value at that path.
//! Resource types that R4B does not have (R4-only ones such as `MedicinalProduct`) are
//! skipped and rest on the JSON-level checks alone.

use fhir_sdk::r4b::resources::Resource;
use serde_json::Value;

use crate::error::{Issue, IssueCode};

/// The outcome of the typed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypedCheck {
    /// The resource round-tripped through the typed model unchanged.
    Passed,
    /// The typed model does not cover this resource type.
    Skipped(&'static str),
    /// The typed model rejected or changed the resource.
    Failed(Issue),
}

// Parsing a `Resource` instantiates a very large amount of serde code: these two
// functions are the only places it happens, kept out of line and non-generic so the
// cost is paid once, in this crate.
#[inline(never)]
fn parse_typed(bytes: &[u8]) -> Result<Resource, serde_json::Error> {
    serde_json::from_slice(bytes)
}

#[inline(never)]
fn serialize_typed(resource: &Resource) -> Result<Value, serde_json::Error> {
    serde_json::to_value(resource)
}

/// Runs the typed round trip on one resource (a Bundle is checked without its entries'
/// resources; callers check those one by one).
pub fn typed_check(v: &Value) -> TypedCheck {
    let ty = v.get("resourceType").and_then(Value::as_str).unwrap_or("Resource");
    let bytes = match serde_json::to_vec(v) {
        Ok(b) => b,
        Err(_) => return TypedCheck::Failed(Issue::error(IssueCode::Exception, "could not re-encode the resource")),
    };
    let typed = match parse_typed(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("unknown variant") && msg.contains(ty) {
                return TypedCheck::Skipped("resource type not in the R4B models");
            }
            return TypedCheck::Failed(
                Issue::error(IssueCode::Invalid, format!("does not match the FHIR structure or holds an invalid value: {}", redact(&msg))).at(ty),
            );
        }
    };
    let round = match serialize_typed(&typed) {
        Ok(r) => r,
        Err(_) => return TypedCheck::Failed(Issue::error(IssueCode::Exception, "could not serialize the typed resource")),
    };
    let mut path = ty.to_owned();
    match first_difference(v, &round, &mut path) {
        None => TypedCheck::Passed,
        Some(p) => TypedCheck::Failed(
            Issue::error(IssueCode::Structure, "unknown element, or a value of the wrong type for this element").at(p),
        ),
    }
}

/// Serde's messages quote the offending value; values may be patient content.
fn redact(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quote: Option<char> = None;
    for c in msg.chars() {
        match quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None if c == '"' => {
                out.push(c);
                quote = Some('"');
            }
            None => out.push(c),
        }
    }
    // Drop serde's "at line x column y": it points into our re-encoding, not the input.
    match out.find(" at line ") {
        Some(i) => out[..i].to_owned(),
        None => out,
    }
}

fn first_difference(orig: &Value, round: &Value, path: &mut String) -> Option<String> {
    match (orig, round) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, av) in a {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                match b.get(k) {
                    None => return Some(path.clone()),
                    Some(bv) => {
                        if let Some(p) = first_difference(av, bv, path) {
                            return Some(p);
                        }
                    }
                }
                path.truncate(len);
            }
            None
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Some(path.clone());
            }
            for (i, (av, bv)) in a.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if let Some(p) = first_difference(av, bv, path) {
                    return Some(p);
                }
                path.truncate(len);
            }
            None
        }
        (Value::Number(a), Value::Number(b)) => {
            let (x, y) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
            let same = a == b || x == y || ((x - y).abs() <= 1e-9 * x.abs().max(y.abs()));
            if same { None } else { Some(path.clone()) }
        }
        (Value::String(a), Value::String(b)) => {
            // base64Binary may carry whitespace, which the typed model drops on re-encoding.
            let same_base64 = || a.split_ascii_whitespace().collect::<String>() == *b;
            if a == b || same_instant(a, b) || same_base64() { None } else { Some(path.clone()) }
        }
        (a, b) if a == b => None,
        _ => Some(path.clone()),
    }
}

/// `2020-01-01T00:00:00+00:00` and `2020-01-01T00:00:00Z` are the same instant.
fn same_instant(a: &str, b: &str) -> bool {
    match (chrono::DateTime::parse_from_rfc3339(a), chrono::DateTime::parse_from_rfc3339(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_quoted_values() {
        assert_eq!(redact(r#"invalid type: string "John Smith", expected a date at line 1 column 5"#), "invalid type: string \"…\", expected a date");
    }

    #[test]
    fn numbers_compare_by_value() {
        let a: Value = serde_json::from_str(r#"{"v": 82.30}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"v": 82.3}"#).unwrap();
        assert_eq!(first_difference(&a, &b, &mut String::new()), None);
    }
}
