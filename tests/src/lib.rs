//! Shared helpers for Chartline's end-to-end tests: where the fixtures are, and how to
//! read them.

use std::path::{Path, PathBuf};

/// `../shared/fixtures` seen from the repository root (override with `CHARTLINE_FIXTURES`).
pub fn fixtures() -> PathBuf {
    if let Ok(p) = std::env::var("CHARTLINE_FIXTURES") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// The JSON files directly inside a fixture folder, sorted.
pub fn json_files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join(dir))
        .unwrap_or_else(|e| panic!("fixture folder {dir} must exist: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    v
}

/// The Synthea fixture Bundles in the order a real server takes them: the hospital and
/// practitioner `batch` Bundles first (conditional references resolve against them),
/// then the patients.
pub fn synthea_bundles() -> Vec<PathBuf> {
    let mut v = json_files("synthea/blaze-synthea-2.7.0");
    // `0-hospitalInformation…` sorts before `0-practitionerInformation…`, both before patients.
    v.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (!name.starts_with("0-hospital"), !name.starts_with("0-practitioner"), name)
    });
    v.extend(json_files("synthea/smart-generated-sample-data-r4"));
    v
}

/// Reads a fixture as JSON.
pub fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}
