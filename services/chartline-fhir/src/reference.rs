//! FHIR `Reference.reference` strings: finding, classifying and rewriting them.

use serde_json::Value;

/// A classified `Reference.reference` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference<'a> {
    /// `#id`: a contained resource.
    Contained(&'a str),
    /// `Type/id` or `Type/id/_history/v`, optionally behind a base URL.
    Literal {
        /// The resource type.
        resource_type: &'a str,
        /// The logical id.
        id: &'a str,
        /// The version, when the reference is version-specific.
        version: Option<&'a str>,
        /// Whether the reference had a base URL (`http://…/Type/id`).
        absolute: bool,
    },
    /// `urn:uuid:…` or `urn:oid:…`: resolvable only inside the Bundle that carries it.
    Urn(&'a str),
    /// `Type?search`: a conditional reference, resolved by search at ingest.
    Conditional {
        /// The resource type searched.
        resource_type: &'a str,
        /// The query string after `?`.
        query: &'a str,
    },
    /// Anything else (a URL that is not RESTful, a canonical).
    Other(&'a str),
}

/// Classifies a reference string.
pub fn parse_reference(s: &str) -> Reference<'_> {
    if let Some(id) = s.strip_prefix('#') {
        return Reference::Contained(id);
    }
    if s.starts_with("urn:uuid:") || s.starts_with("urn:oid:") {
        return Reference::Urn(s);
    }
    if let Some((ty, query)) = s.split_once('?') {
        if crate::is_resource_type(ty) {
            return Reference::Conditional { resource_type: ty, query };
        }
        return Reference::Other(s);
    }
    let absolute = s.contains("://");
    let parts: Vec<&str> = s.split('/').collect();
    // Look for the last `Type/id` (optionally followed by `_history/v`).
    let n = parts.len();
    let (ty, id, version) = if n >= 4 && parts[n - 2] == "_history" {
        (parts[n - 4], parts[n - 3], Some(parts[n - 1]))
    } else if n >= 2 {
        (parts[n - 2], parts[n - 1], None)
    } else {
        return Reference::Other(s);
    };
    if crate::is_resource_type(ty) && crate::is_valid_id(id) {
        Reference::Literal { resource_type: ty, id, version, absolute }
    } else {
        Reference::Other(s)
    }
}

/// Calls `f(path, reference)` for every `reference` string in the tree.
pub fn for_each_reference(v: &Value, f: &mut dyn FnMut(&str, &str)) {
    fn walk(v: &Value, path: &mut String, f: &mut dyn FnMut(&str, &str)) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    let len = path.len();
                    path.push('.');
                    path.push_str(k);
                    if k == "reference" {
                        if let Value::String(s) = child {
                            f(path, s);
                        }
                    } else {
                        walk(child, path, f);
                    }
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    walk(child, path, f);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }
    let mut path = v.get("resourceType").and_then(Value::as_str).unwrap_or("").to_owned();
    walk(v, &mut path, f);
}

/// Calls `f(path, reference)` for every `reference` string in the tree, allowing rewrites.
pub fn for_each_reference_mut<E>(
    v: &mut Value,
    f: &mut dyn FnMut(&str, &mut String) -> Result<(), E>,
) -> Result<(), E> {
    fn walk<E>(
        v: &mut Value,
        path: &mut String,
        f: &mut dyn FnMut(&str, &mut String) -> Result<(), E>,
    ) -> Result<(), E> {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    let len = path.len();
                    path.push('.');
                    path.push_str(k);
                    if k == "reference" {
                        if let Value::String(s) = child {
                            f(path, s)?;
                        }
                    } else {
                        walk(child, path, f)?;
                    }
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter_mut().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    walk(child, path, f)?;
                    path.truncate(len);
                }
            }
            _ => {}
        }
        Ok(())
    }
    let mut path = v.get("resourceType").and_then(Value::as_str).unwrap_or("").to_owned();
    walk(v, &mut path, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_classified() {
        assert_eq!(parse_reference("#med1"), Reference::Contained("med1"));
        assert_eq!(parse_reference("urn:uuid:abc"), Reference::Urn("urn:uuid:abc"));
        assert_eq!(
            parse_reference("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|123"),
            Reference::Conditional { resource_type: "Practitioner", query: "identifier=http://hl7.org/fhir/sid/us-npi|123" }
        );
        assert_eq!(
            parse_reference("Patient/p1"),
            Reference::Literal { resource_type: "Patient", id: "p1", version: None, absolute: false }
        );
        assert_eq!(
            parse_reference("http://ehr.example/fhir/Observation/o1/_history/2"),
            Reference::Literal { resource_type: "Observation", id: "o1", version: Some("2"), absolute: true }
        );
        assert!(matches!(parse_reference("http://loinc.org"), Reference::Other(_)));
    }

    #[test]
    fn every_nested_reference_is_visited_and_rewritable() {
        let mut v = serde_json::json!({
            "resourceType": "Encounter",
            "subject": {"reference": "urn:uuid:1"},
            "participant": [{"individual": {"reference": "urn:uuid:2"}}]
        });
        let mut seen = vec![];
        for_each_reference_mut::<()>(&mut v, &mut |path, r| {
            seen.push(path.to_owned());
            *r = r.replace("urn:uuid:", "Patient/");
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, ["Encounter.participant[0].individual.reference", "Encounter.subject.reference"]);
        assert_eq!(v["subject"]["reference"], "Patient/1");
    }
}
