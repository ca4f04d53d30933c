//! Images in the chart: the image attachments of DocumentReference (`content[i].attachment`),
//! Media (`content`) and DiagnosticReport (`presentedForm[i]`), and where their bytes are.
//!
//! An image is an attachment whose `contentType` (case-insensitive, parameters ignored) is
//! `image/png`, `image/jpeg` or `application/dicom`. Its bytes are the inline `data`
//! (base64), or the `Binary` stored in Chartline that `url` names: `Binary/{id}`,
//! `Binary/{id}/_history/{v}`, or an absolute URL ending in one of those (ingest rewrites a
//! `url` that spells a fullUrl of the same Bundle, `urn:uuid:` included, to `Binary/{id}`).
//! Any other url is remote: listed, never fetched. ImagingStudy carries no pixel data; it
//! stays a fact line of the Imaging section.

use base64::Engine;
use chartline_store::EventRow;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::prompt::Citation;

/// Content types Chartline treats as images.
pub const IMAGE_CONTENT_TYPES: &[&str] = &["image/png", "image/jpeg", "application/dicom"];

/// Event kinds whose resources can hold image attachments.
pub(crate) const IMAGE_KINDS: &[&str] = &["document", "media", "diagnostic-report"];

/// The database-side prefilter (a superset of [`IMAGE_CONTENT_TYPES`]; Rust decides).
pub(crate) const IMAGE_FILTER: &str =
    r#"lax $.**.contentType ? (@ like_regex "^(image/|application/dicom)" flag "i")"#;

/// Resource types whose attachments [`attachment_at`] knows.
pub const ATTACHMENT_TYPES: &[&str] = &["DocumentReference", "Media", "DiagnosticReport"];

/// Where an attachment's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// Inline base64 `data`.
    Inline,
    /// A `Binary` Chartline may store (`absolute`: named by a full URL).
    Binary {
        id: String,
        version: Option<i64>,
        absolute: bool,
    },
    /// A url Chartline never fetches (remote, or an unresolved urn).
    Remote,
    /// Neither data nor url.
    Absent,
}

/// One image attachment found in the chart.
#[derive(Debug, Clone)]
pub(crate) struct ChartImage {
    pub source: Citation,
    pub attachment_index: usize,
    pub content_type: String,
    pub title: String,
    pub time: Option<DateTime<Utc>>,
    pub location: Location,
}

impl ChartImage {
    /// Whether the bytes may be in Chartline (inline, or a Binary that may be stored).
    pub fn retrievable(&self) -> bool {
        matches!(self.location, Location::Inline | Location::Binary { .. })
    }
}

/// The bytes of an image chosen for a prompt.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub size: u64,
    pub sha256: String,
}

/// `contentType` lower-cased without parameters.
pub(crate) fn media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_image(ct: &str) -> bool {
    IMAGE_CONTENT_TYPES.contains(&media_type(ct).as_str())
}

/// The attachments of a resource with their indices (see [`ATTACHMENT_TYPES`]).
pub(crate) fn attachments(resource: &Value) -> Vec<(usize, &Value)> {
    match resource.get("resourceType").and_then(Value::as_str) {
        Some("DocumentReference") => resource
            .get("content")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.get("attachment").map(|a| (i, a)))
                    .collect()
            })
            .unwrap_or_default(),
        Some("Media") => resource
            .get("content")
            .filter(|c| c.is_object())
            .map(|a| vec![(0, a)])
            .unwrap_or_default(),
        Some("DiagnosticReport") => resource
            .get("presentedForm")
            .and_then(Value::as_array)
            .map(|fs| fs.iter().enumerate().collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The attachment at `index`, if any.
pub(crate) fn attachment_at(resource: &Value, index: usize) -> Option<&Value> {
    attachments(resource)
        .into_iter()
        .find(|(i, _)| *i == index)
        .map(|(_, a)| a)
}

/// Whether the resource (or its document status) is entered-in-error.
pub(crate) fn entered_in_error(resource: &Value) -> bool {
    ["status", "docStatus"]
        .iter()
        .any(|k| resource.get(*k).and_then(Value::as_str) == Some("entered-in-error"))
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Where the attachment's bytes are: inline data first, else its url.
pub(crate) fn location(attachment: &Value) -> Location {
    if attachment.get("data").and_then(Value::as_str).is_some() {
        return Location::Inline;
    }
    let Some(url) = attachment.get("url").and_then(Value::as_str) else {
        return Location::Absent;
    };
    let absolute = url.contains("://");
    if !absolute && (url.starts_with("urn:") || url.starts_with('#')) {
        return Location::Remote;
    }
    let parts: Vec<&str> = url.split('/').collect();
    let n = parts.len();
    let (ty, id, version) = if n >= 4 && parts[n - 2] == "_history" {
        (parts[n - 4], parts[n - 3], Some(parts[n - 1]))
    } else if n >= 2 {
        (parts[n - 2], parts[n - 1], None)
    } else {
        return Location::Remote;
    };
    // A relative url must be exactly `Binary/{id}[/_history/{v}]`.
    let shape = if version.is_some() { 4 } else { 2 };
    if ty != "Binary" || !is_id(id) || (!absolute && n != shape) {
        return Location::Remote;
    }
    let version = match version {
        None => None,
        Some(v) => match v.parse::<i64>() {
            Ok(v) if v >= 1 => Some(v),
            _ => return Location::Remote,
        },
    };
    Location::Binary {
        id: id.to_owned(),
        version,
        absolute,
    }
}

/// Decodes base64 that may hold white space (as FHIR allows).
pub(crate) fn decode_base64(data: &str) -> Option<Vec<u8>> {
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
}

/// The decoded length of base64 text, without decoding it (an upper bound for bad input).
pub(crate) fn decoded_len(data: &str) -> u64 {
    let mut chars = 0u64;
    let mut pad = 0u64;
    for b in data.bytes() {
        if b.is_ascii_whitespace() {
            continue;
        }
        chars += 1;
        if b == b'=' {
            pad += 1;
        }
    }
    (chars / 4 * 3 + (chars % 4) * 3 / 4).saturating_sub(pad)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let d = chrono::NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok()?;
    Some(d.and_hms_opt(0, 0, 0)?.and_utc())
}

/// The image attachments of the given resources (each with the event row that indexes it),
/// entered-in-error resources left out, newest first (undated last), then by type, id and
/// attachment index.
pub(crate) fn discover(
    rows: &[(EventRow, Value)],
    label: impl Fn(&EventRow) -> Option<String>,
) -> Vec<ChartImage> {
    let mut out = Vec::new();
    for (event, resource) in rows {
        if entered_in_error(resource) || event.status.as_deref() == Some("entered-in-error") {
            continue;
        }
        for (index, a) in attachments(resource) {
            let Some(ct) = a
                .get("contentType")
                .and_then(Value::as_str)
                .filter(|ct| is_image(ct))
            else {
                continue;
            };
            let title = a
                .get("title")
                .and_then(Value::as_str)
                .map(crate::sections::one_line)
                .filter(|t| !t.is_empty())
                .or_else(|| label(event))
                .unwrap_or_else(|| "image".to_owned());
            let time = event.time.or_else(|| {
                a.get("creation")
                    .and_then(Value::as_str)
                    .and_then(parse_time)
            });
            out.push(ChartImage {
                source: Citation {
                    resource_type: event.resource_type.clone(),
                    id: event.resource_id.clone(),
                    version_id: event.version_id,
                },
                attachment_index: index,
                content_type: media_type(ct),
                title,
                time,
                location: location(a),
            });
        }
    }
    sort_newest_first(&mut out);
    out
}

/// Newest first, undated last; ties by resource type, id, attachment index.
pub(crate) fn sort_newest_first(images: &mut [ChartImage]) {
    images.sort_by(|a, b| {
        let newer = match (a.time, b.time) {
            (Some(x), Some(y)) => y.cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        newer
            .then_with(|| a.source.resource_type.cmp(&b.source.resource_type))
            .then_with(|| a.source.id.cmp(&b.source.id))
            .then(a.attachment_index.cmp(&b.attachment_index))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_name_stored_binaries_or_are_remote() {
        let loc = |u: &str| location(&json!({ "url": u }));
        assert_eq!(
            loc("Binary/b1"),
            Location::Binary {
                id: "b1".into(),
                version: None,
                absolute: false
            }
        );
        assert_eq!(
            loc("Binary/b1/_history/3"),
            Location::Binary {
                id: "b1".into(),
                version: Some(3),
                absolute: false
            }
        );
        assert_eq!(
            loc("https://ehr.example/fhir/Binary/b1"),
            Location::Binary {
                id: "b1".into(),
                version: None,
                absolute: true
            }
        );
        for remote in [
            "https://pacs.example/wado/123.png",
            "urn:uuid:0b5e4b2a-8a4c-4c7e-9d8e-1f2a3b4c5d6e",
            "Binary",
            "Media/m1",
            "x/Binary/b1",
            "Binary/b1/_history/zero",
            "Binary/bad id",
        ] {
            assert_eq!(loc(remote), Location::Remote, "{remote}");
        }
        assert_eq!(
            location(&json!({ "data": "AAAA", "url": "https://x/y.png" })),
            Location::Inline,
            "data wins"
        );
        assert_eq!(
            location(&json!({ "contentType": "image/png" })),
            Location::Absent
        );
    }

    #[test]
    fn content_types_ignore_case_and_parameters() {
        assert!(is_image("IMAGE/PNG"));
        assert!(is_image("image/jpeg; quality=90"));
        assert!(is_image("application/dicom"));
        assert!(!is_image("text/plain"));
        assert!(!is_image("image/gif"));
        assert!(!is_image("application/pdf"));
    }

    #[test]
    fn decoded_length_matches_decoding() {
        for raw in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            b"\x00\xff\x10\x20\x30",
        ] {
            let enc = base64::engine::general_purpose::STANDARD.encode(raw);
            let spaced: String = enc.chars().flat_map(|c| [c, '\n']).collect();
            assert_eq!(decoded_len(&spaced), raw.len() as u64, "{enc}");
            assert_eq!(decode_base64(&spaced).as_deref(), Some(raw));
        }
        assert_eq!(decode_base64("not base64!"), None);
    }

    #[test]
    fn attachments_are_indexed_per_resource_type() {
        let doc = json!({"resourceType": "DocumentReference", "content": [{"attachment": {"contentType": "text/plain"}}, {"attachment": {"contentType": "image/png"}}]});
        assert_eq!(
            attachments(&doc)
                .iter()
                .map(|(i, _)| *i)
                .collect::<Vec<_>>(),
            [0, 1]
        );
        let media = json!({"resourceType": "Media", "content": {"contentType": "image/jpeg"}});
        assert_eq!(
            attachment_at(&media, 0).and_then(|a| a["contentType"].as_str()),
            Some("image/jpeg")
        );
        assert!(attachment_at(&media, 1).is_none());
        let dr = json!({"resourceType": "DiagnosticReport", "presentedForm": [{"contentType": "application/dicom"}]});
        assert!(attachment_at(&dr, 0).is_some());
        assert!(attachments(&json!({"resourceType": "Observation"})).is_empty());
    }
}
