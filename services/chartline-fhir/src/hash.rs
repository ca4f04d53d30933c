//! Content hashing for change detection.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// sha256 of a resource's canonical JSON (keys sorted, no insignificant whitespace),
/// leaving out `meta.versionId` and `meta.lastUpdated`, which the server sets: two
/// submissions of the same content hash alike, so a re-send makes no new version.
pub fn content_sha256(resource: &Value) -> [u8; 32] {
    let mut hasher = Sha256::new();
    write_canonical(resource, &mut hasher, true);
    hasher.finalize().into()
}

fn write_canonical(v: &Value, h: &mut Sha256, top: bool) {
    match v {
        Value::Object(map) => {
            // serde_json's Map is a BTreeMap here (no `preserve_order`), so keys come sorted.
            h.update(b"{");
            let mut first = true;
            for (k, val) in map {
                if top && k == "meta" {
                    if let Value::Object(meta) = val {
                        let rest: serde_json::Map<String, Value> = meta
                            .iter()
                            .filter(|(k, _)| k.as_str() != "versionId" && k.as_str() != "lastUpdated")
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        if rest.is_empty() {
                            continue;
                        }
                        sep(h, &mut first);
                        key(h, k);
                        write_canonical(&Value::Object(rest), h, false);
                        continue;
                    }
                }
                sep(h, &mut first);
                key(h, k);
                write_canonical(val, h, false);
            }
            h.update(b"}");
        }
        Value::Array(items) => {
            h.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                write_canonical(item, h, false);
            }
            h.update(b"]");
        }
        other => h.update(other.to_string().as_bytes()),
    }
}

fn sep(h: &mut Sha256, first: &mut bool) {
    if !*first {
        h.update(b",");
    }
    *first = false;
}

fn key(h: &mut Sha256, k: &str) {
    h.update(Value::String(k.to_owned()).to_string().as_bytes());
    h.update(b":");
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
    fn any_content_change_changes_the_hash() {
        let a = json!({"resourceType": "Patient", "id": "p", "gender": "male"});
        let b = json!({"resourceType": "Patient", "id": "p", "gender": "female"});
        let c = json!({"resourceType": "Patient", "id": "p", "gender": "male", "meta": {"profile": ["x"]}});
        assert_ne!(content_sha256(&a), content_sha256(&b));
        assert_ne!(content_sha256(&a), content_sha256(&c), "meta other than version/time is content");
    }
}
