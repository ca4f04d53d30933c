//! Content hashing for change detection.

use sha2::{Digest, Sha256};

use crate::tree::{Json as Value, Object};

/// sha256 of a resource's canonical JSON (keys sorted, no insignificant whitespace),
/// leaving out `meta.versionId` and `meta.lastUpdated`, which the server sets: two
/// submissions of the same content hash alike, so a re-send makes no new version.
pub fn content_sha256(resource: &Value) -> [u8; 32] {
    *CanonicalJson::of(resource).sha256()
}

/// A resource's canonical JSON (what [`content_sha256`] hashes) and where the server-managed
/// `meta.versionId` and `meta.lastUpdated` go back in. One serialization serves both the
/// content hash and the stored text of a version ([`CanonicalJson::with_server_meta`]).
#[derive(Debug, Clone)]
pub struct CanonicalJson {
    bytes: Vec<u8>,
    /// sha256 of `bytes`: the content hash.
    sha256: [u8; 32],
    /// Where the server elements are inserted, in order; None when `meta` is not an object
    /// (invalid, and stored as it came).
    slots: Option<Slots>,
}

#[derive(Debug, Clone)]
enum Slots {
    /// No client `meta` elements: a whole `"meta":{...}` member goes at this top-level slot.
    Member(Slot),
    /// Inside the client's `meta` object, in key order.
    Inside { last_updated: Slot, version_id: Slot },
}

/// A position between members of an object in the canonical bytes.
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: usize,
    /// A member precedes the position (a comma goes before what is inserted)...
    after_member: bool,
    /// ...or follows it (a comma goes after).
    before_member: bool,
}

impl CanonicalJson {
    /// Serializes `resource` canonically. A [`crate::Json`] object is sorted by key, so its
    /// compact serialization is already canonical (byte for byte what serde_json writes for
    /// the same `Value`, whose B-tree map has the same order); only the top-level `meta`
    /// needs its server-managed elements left out.
    pub fn of(resource: &Value) -> Self {
        let mut buf = Vec::with_capacity(1024);
        let Value::Object(map) = resource else {
            write_json(&mut buf, resource);
            return CanonicalJson { sha256: Sha256::digest(&buf).into(), bytes: buf, slots: None };
        };
        let is_server = |k: &str| k == "versionId" || k == "lastUpdated";
        let client_meta = match map.get("meta") {
            None => Some(None),
            Some(Value::Object(m)) => Some(m.keys().any(|k| !is_server(k)).then_some(m)),
            Some(_) => None,
        };
        let mut slots = None;
        buf.push(b'{');
        let mut first = true;
        for (k, val) in map {
            if let Some(None) = client_meta {
                // The whole meta member goes before the first key after "meta".
                if slots.is_none() && k >= "meta" {
                    slots = Some(Slots::Member(Slot { at: buf.len(), after_member: !first, before_member: false }));
                }
                if k == "meta" {
                    continue;
                }
            }
            if !first {
                buf.push(b',');
            }
            first = false;
            write_json(&mut buf, k);
            buf.push(b':');
            match (k, val, client_meta) {
                ("meta", Value::Object(meta), Some(Some(_))) => slots = Some(write_meta(&mut buf, meta)),
                _ => write_json(&mut buf, val),
            }
        }
        match (&mut slots, client_meta) {
            (None, Some(None)) => slots = Some(Slots::Member(Slot { at: buf.len(), after_member: !first, before_member: false })),
            // Recorded at the "meta" key: a member follows only if one was written after it.
            (Some(Slots::Member(slot)), _) => slot.before_member = buf.len() > slot.at,
            _ => {}
        }
        buf.push(b'}');
        CanonicalJson { sha256: Sha256::digest(&buf).into(), bytes: buf, slots }
    }

    /// The canonical bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// sha256 of the canonical bytes (the content hash).
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// The JSON text of the version as stored: the canonical form with `meta.versionId` and
    /// `meta.lastUpdated` set, byte for byte what serializing the resource with those two
    /// set would give (keys sorted, compact).
    pub fn with_server_meta(&self, version_id: &str, last_updated: &str) -> String {
        let member = |key: &str, value: &str| {
            let mut m = Vec::with_capacity(key.len() + value.len() + 8);
            write_json(&mut m, key);
            m.push(b':');
            write_json(&mut m, value);
            m
        };
        let lu = member("lastUpdated", last_updated);
        let vi = member("versionId", version_id);
        let mut out = Vec::with_capacity(self.bytes.len() + lu.len() + vi.len() + 16);
        let mut from = 0;
        let mut insert = |out: &mut Vec<u8>, slot: Slot, members: &[&[u8]]| {
            out.extend_from_slice(&self.bytes[from..slot.at]);
            from = slot.at;
            if slot.after_member {
                out.push(b',');
            }
            for (i, m) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(m);
            }
            if !slot.after_member && slot.before_member {
                out.push(b',');
            }
        };
        match &self.slots {
            None => {}
            Some(Slots::Member(slot)) => {
                let whole = [&b"\"meta\":{"[..], &lu, b",", &vi, b"}"].concat();
                insert(&mut out, *slot, &[&whole]);
            }
            Some(Slots::Inside { last_updated, version_id }) if last_updated.at == version_id.at => {
                let slot = Slot { before_member: version_id.before_member, ..*last_updated };
                insert(&mut out, slot, &[&lu, &vi]);
            }
            Some(Slots::Inside { last_updated, version_id }) => {
                insert(&mut out, *last_updated, &[&lu]);
                insert(&mut out, *version_id, &[&vi]);
            }
        }
        out.extend_from_slice(&self.bytes[from..]);
        // Serialized JSON and JSON strings spliced at member boundaries: UTF-8 throughout.
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// Writes the client's `meta` elements (at least one) without the server's, noting where
/// `lastUpdated` and `versionId` belong in key order.
fn write_meta(buf: &mut Vec<u8>, meta: &Object) -> Slots {
    buf.push(b'{');
    let mut first = true;
    let (mut last_updated, mut version_id) = (None, None);
    for (k, v) in meta {
        if k == "versionId" || k == "lastUpdated" {
            continue;
        }
        for (name, slot) in [("lastUpdated", &mut last_updated), ("versionId", &mut version_id)] {
            if slot.is_none() && k > name {
                *slot = Some(Slot { at: buf.len(), after_member: !first, before_member: true });
            }
        }
        if !first {
            buf.push(b',');
        }
        first = false;
        write_json(buf, k);
        buf.push(b':');
        write_json(buf, v);
    }
    let end = Slot { at: buf.len(), after_member: true, before_member: false };
    buf.push(b'}');
    Slots::Inside { last_updated: last_updated.unwrap_or(end), version_id: version_id.unwrap_or(end) }
}

fn write_json<T: serde::Serialize + ?Sized>(buf: &mut Vec<u8>, v: &T) {
    // Writing a tree or a str into a Vec cannot fail (no non-string keys, no IO).
    let _ = serde_json::to_writer(&mut *buf, v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_managed_meta_does_not_change_the_hash() {
        let a = tree!({"resourceType": "Patient", "id": "p", "meta": {"versionId": "1", "lastUpdated": "2020-01-01T00:00:00Z"}});
        let b = tree!({"resourceType": "Patient", "id": "p", "meta": {"versionId": "7"}});
        let c = tree!({"id": "p", "resourceType": "Patient"});
        assert_eq!(content_sha256(&a), content_sha256(&b));
        assert_eq!(content_sha256(&a), content_sha256(&c), "key order must not matter");
    }

    #[test]
    fn the_canonical_form_is_sorted_compact_json_without_server_meta() {
        // Stored hashes must stay comparable across releases: pin the exact bytes hashed.
        let v = tree!({"resourceType": "Patient", "meta": {"versionId": "3", "profile": ["x"]}, "id": "p",
                       "name": [{"given": ["Zoë", "A\"B"]}], "b": 1.5, "a": null});
        let canonical = r#"{"a":null,"b":1.5,"id":"p","meta":{"profile":["x"]},"name":[{"given":["Zoë","A\"B"]}],"resourceType":"Patient"}"#;
        assert_eq!(content_sha256(&v), <[u8; 32]>::from(Sha256::digest(canonical.as_bytes())));
    }

    /// What the store wrote before: the resource with the server meta set, serialized.
    fn stored_the_slow_way(v: &Value, version: &str, last_updated: &str) -> String {
        let mut v = serde_json::Value::from(v);
        if let serde_json::Value::Object(map) = &mut v {
            if let serde_json::Value::Object(m) = map.entry("meta").or_insert_with(|| serde_json::json!({})) {
                m.insert("versionId".into(), serde_json::json!(version));
                m.insert("lastUpdated".into(), serde_json::json!(last_updated));
            }
        }
        serde_json::to_string(&v).unwrap_or_default()
    }

    #[test]
    fn stored_text_is_the_resource_serialized_with_server_meta() {
        let cases = [
            tree!({"resourceType": "Patient", "id": "p"}),
            tree!({"resourceType": "Patient", "id": "p", "meta": {"versionId": "9", "lastUpdated": "2001-01-01T00:00:00Z"}}),
            tree!({"resourceType": "Patient", "id": "p", "meta": {"profile": ["x"]}}),
            tree!({"resourceType": "Patient", "id": "p", "meta": {"extension": [{"url": "u", "valueString": "v"}]}}),
            tree!({"resourceType": "Patient", "id": "p", "meta": {"tag": [{"code": "t"}], "id": "m", "versionId": "2"}}),
            tree!({"resourceType": "Patient", "id": "p", "meta": {"source": "s", "extension": [{"url": "u", "valueCode": "c"}], "zz": 1}}),
            tree!({"resourceType": "Patient", "id": "p", "meta": {"zz": 1}}),
            tree!({"resourceType": "Patient", "id": "p", "meta": {"aa": 1}}),
            tree!({"a": 1, "resourceType": "Patient", "zzz": {"meta": 1}}),
            tree!({"meta": {"profile": ["x"]}}),
            tree!({"meta": {}}),
            tree!({"meta": {"versionId": "1"}}),
            tree!({"a": 1, "meta": {"lastUpdated": "x"}}),
            tree!({"meta": {"versionId": "1"}, "z": 1}),
            tree!({"z": 1}),
            tree!({"a": 1}),
            tree!({}),
            tree!({"resourceType": "Patient", "meta": "not an object"}),
            tree!({"resourceType": "Patient", "name": [{"text": "Zoë \"quoted\" \u{1}"}]}),
        ];
        for v in &cases {
            let c = CanonicalJson::of(v);
            assert_eq!(c.with_server_meta("12", "2026-11-30T12:00:00.123456Z"), stored_the_slow_way(v, "12", "2026-11-30T12:00:00.123456Z"), "{v}");
            assert_eq!(*c.sha256(), content_sha256(v));
            assert_eq!(*c.sha256(), <[u8; 32]>::from(Sha256::digest(c.as_bytes())));
        }
    }

    #[test]
    fn stored_text_matches_for_every_fixture_resource() {
        let dir = crate::test_fixtures().join("synthea/blaze-synthea-2.7.0");
        let mut files: Vec<_> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        files.sort();
        assert!(files.len() >= 3, "fixtures at {}", dir.display());
        let mut n = 0;
        for f in files.iter().take(3) {
            let bundle = crate::parse_json(&std::fs::read(f).unwrap_or_default(), &crate::Limits::default()).unwrap_or_default();
            for e in bundle["entry"].as_array().unwrap_or_default() {
                let r = &e["resource"];
                assert_eq!(CanonicalJson::of(r).with_server_meta("1", "2026-11-30T00:00:00Z"), stored_the_slow_way(r, "1", "2026-11-30T00:00:00Z"));
                n += 1;
            }
        }
        assert!(n > 100, "{n} resources compared");
    }

    #[test]
    fn any_content_change_changes_the_hash() {
        let a = tree!({"resourceType": "Patient", "id": "p", "gender": "male"});
        let b = tree!({"resourceType": "Patient", "id": "p", "gender": "female"});
        let c = tree!({"resourceType": "Patient", "id": "p", "gender": "male", "meta": {"profile": ["x"]}});
        assert_ne!(content_sha256(&a), content_sha256(&b));
        assert_ne!(content_sha256(&a), content_sha256(&c), "meta other than version/time is content");
    }
}
