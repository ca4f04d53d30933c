//! FHIR `Reference.reference` strings: finding, classifying and rewriting them.

use std::fmt::Write as _;

use crate::tree::Json as Value;

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
    // The last `Type/id`, optionally followed by `_history/v`.
    let mut parts = s.rsplit('/');
    let (Some(last), Some(before)) = (parts.next(), parts.next()) else { return Reference::Other(s) };
    let (ty, id, version) = if before == "_history" {
        match (parts.next(), parts.next()) {
            (Some(id), Some(ty)) => (ty, id, Some(last)),
            _ => return Reference::Other(s),
        }
    } else {
        (before, last, None)
    };
    if crate::is_resource_type(ty) && crate::is_valid_id(id) {
        Reference::Literal { resource_type: ty, id, version, absolute }
    } else {
        Reference::Other(s)
    }
}

/// Calls `f(reference)` for every `reference` string in the tree.
pub fn for_each_reference(v: &Value, f: &mut dyn FnMut(&str)) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match child {
                    Value::String(s) if k == "reference" => f(s),
                    _ => for_each_reference(child, f),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|child| for_each_reference(child, f)),
        _ => {}
    }
}

/// The kind of link element [`for_each_link_mut`] visits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A `reference` string (`Reference.reference`).
    Reference,
    /// A `url` string (an Attachment's, an extension's…).
    Url,
}

/// Where [`for_each_link_mut`] is in the tree: a chain of segments up to the resource,
/// kept on the walk's stack and spelled out only when asked (error messages).
pub struct LinkPath<'a> {
    parent: Option<&'a LinkPath<'a>>,
    segment: PathSegment<'a>,
}

enum PathSegment<'a> {
    Root(&'a str),
    Key(&'a str),
    Index(usize),
}

impl LinkPath<'_> {
    /// The FHIRPath-like location, e.g. `Encounter.participant[0].individual.reference`.
    pub fn render(&self) -> String {
        let mut chain = Vec::new();
        let mut at = Some(self);
        while let Some(p) = at {
            chain.push(&p.segment);
            at = p.parent;
        }
        let mut out = String::new();
        for segment in chain.into_iter().rev() {
            match segment {
                PathSegment::Root(ty) => out.push_str(ty),
                PathSegment::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                PathSegment::Index(i) => {
                    let _ = write!(out, "[{i}]");
                }
            }
        }
        out
    }
}

/// Calls `f(kind, path, value)` for every `reference` and every `url` string in the tree,
/// allowing rewrites: one walk for the reference and url rules of a transaction.
pub fn for_each_link_mut<E>(v: &mut Value, f: &mut dyn FnMut(Link, &LinkPath<'_>, &mut Box<str>) -> Result<(), E>) -> Result<(), E> {
    fn walk<E>(
        v: &mut Value,
        path: &LinkPath<'_>,
        f: &mut dyn FnMut(Link, &LinkPath<'_>, &mut Box<str>) -> Result<(), E>,
    ) -> Result<(), E> {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    let here = LinkPath { parent: Some(path), segment: PathSegment::Key(k) };
                    match child {
                        Value::String(s) if k == "reference" => f(Link::Reference, &here, s)?,
                        Value::String(s) if k == "url" => f(Link::Url, &here, s)?,
                        _ => walk(child, &here, f)?,
                    }
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter_mut().enumerate() {
                    walk(child, &LinkPath { parent: Some(path), segment: PathSegment::Index(i) }, f)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    let ty = v.get("resourceType").and_then(Value::as_str).unwrap_or("").to_owned();
    walk(v, &LinkPath { parent: None, segment: PathSegment::Root(&ty) }, f)
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
        for other in ["Patient", "/", "_history/2", "Observation/_history/2", "Observation/o1/_history", "Foo/1", "Patient/a b"] {
            assert!(matches!(parse_reference(other), Reference::Other(_)), "{other}");
        }
        assert_eq!(
            parse_reference("Observation/o1/_history/2"),
            Reference::Literal { resource_type: "Observation", id: "o1", version: Some("2"), absolute: false }
        );
    }

    #[test]
    fn every_nested_reference_is_visited_and_rewritable() {
        let mut v = tree!({
            "resourceType": "Encounter",
            "subject": {"reference": "urn:uuid:1"},
            "participant": [{"individual": {"reference": "urn:uuid:2"}}]
        });
        let mut seen = vec![];
        for_each_link_mut::<()>(&mut v, &mut |kind, path, r| {
            seen.push((kind, path.render()));
            *r = r.replace("urn:uuid:", "Patient/").into();
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (Link::Reference, "Encounter.participant[0].individual.reference".to_owned()),
                (Link::Reference, "Encounter.subject.reference".to_owned())
            ]
        );
        assert_eq!(v["subject"]["reference"], "Patient/1");
    }
}
