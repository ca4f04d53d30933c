//! Content hashing for change detection.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// sha256 of a resource's canonical JSON (keys sorted, no insignificant whitespace),
/// leaving out `meta.versionId` and `meta.lastUpdated`, which the server sets: two
/// submissions of the same content hash alike, so a re-send makes no new version.
pub fn content_sha256(resource: &Value) -> [u8; 32] {
    // serde_json's Map is a BTreeMap here (no `preserve_order`), so its compact
    // serialization is already canonical: keys sorted, no whitespace. Only the top-level
    // `meta` needs its server-managed elements left out.
    let mut buf = Vec::with_capacity(1024);
    match resource {
        Value::Object(map) => {
            buf.push(b'{');
            let mut first = true;
            for (k, val) in map {
                let filtered;
                let val = match val {
                    Value::Object(meta) if k == "meta" => {
                        let rest: serde_json::Map<String, Value> = meta
                            .iter()
                            .filter(|(k, _)| k.as_str() != "versionId" && k.as_str() != "lastUpdated")
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        if rest.is_empty() {
                            continue;
                        }
                        filtered = Value::Object(rest);
                        &filtered
                    }
                    other => other,
                };
                if !first {
                    buf.push(b',');
                }
                first = false;
                write_json(&mut buf, k);
                buf.push(b':');
                write_json(&mut buf, val);
            }
            buf.push(b'}');
        }
        other => write_json(&mut buf, other),
    }
    Sha256::digest(&buf).into()
}

fn write_json<T: serde::Serialize + ?Sized>(buf: &mut Vec<u8>, v: &T) {
    // Writing a Value or a str into a Vec cannot fail (no non-string keys, no IO).
    let _ = serde_json::to_writer(&mut *buf, v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_managed_meta_does_not_change_the_hash() {
        let a = json!({"resourceType": "Patient", "id": "p", "meta": {"versionId": "1", "lastUpdated": "2020-01-01T00:00:00Z"}});
        let b = json!({"resourceType": "Patient", "id": "p", "meta": {"versionId": "7"}});
        let c = json!({"id": "p", "resourceType": "Patient"});
        assert_eq!(content_sha256(&a), content_sha256(&b));
        assert_eq!(content_sha256(&a), content_sha256(&c), "key order must not matter");
    }

    #[test]
    fn the_canonical_form_is_sorted_compact_json_without_server_meta() {
        // Stored hashes must stay comparable across releases: pin the exact bytes hashed.
        let v = json!({"resourceType": "Patient", "meta": {"versionId": "3", "profile": ["x"]}, "id": "p",
                       "name": [{"given": ["Zoë", "A\"B"]}], "b": 1.5, "a": null});
        let canonical = r#"{"a":null,"b":1.5,"id":"p","meta":{"profile":["x"]},"name":[{"given":["Zoë","A\"B"]}],"resourceType":"Patient"}"#;
        assert_eq!(content_sha256(&v), <[u8; 32]>::from(Sha256::digest(canonical.as_bytes())));
    }

    #[test]
    fn any_content_change_changes_the_hash() {
        let a = json!({"resourceType": "Patient", "id": "p", "gender": "male"});
        let b = json!({"resourceType": "Patient", "id": "p", "gender": "female"});
        let c = json!({"resourceType": "Patient", "id": "p", "gender": "male", "meta": {"profile": ["x"]}});
        assert_ne!(content_sha256(&a), content_sha256(&b));
        assert_ne!(content_sha256(&a), content_sha256(&c), "meta other than version/time is content");
    }
}
