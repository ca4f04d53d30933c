//! FHIR R4 JSON for Chartline: parsing with limits, structural validation (our own checks
//! plus a round trip through `fhir-sdk`'s typed R4B models), reference walking and the
//! extraction of flat patient events. Nothing here does IO.
//!
//! Everything takes a [`Json`] tree (objects as key-sorted slices, see `tree`): the bytes a
//! client sent are parsed once, at the edge, and every later step works on that tree.

/// `serde_json::json!` as a [`Json`], for this crate's tests (defined before the modules
/// that use it).
#[cfg(test)]
macro_rules! tree {
    ($($t:tt)*) => {
        crate::Json::from(serde_json::json!($($t)*))
    };
}

mod error;
mod events;
mod hash;
mod json;
mod reference;
mod resource_types;
mod tree;
mod typed;
mod typed_compare;
mod typed_de;
mod validate;

pub use error::{FhirError, Issue, IssueCode, Severity};
pub use events::{PatientEvent, extract_events, patient_of};
pub use hash::{CanonicalJson, content_sha256};
pub use json::{Limits, parse_json};
pub use reference::{Link, LinkPath, Reference, for_each_link_mut, for_each_reference, parse_reference};
pub use resource_types::{R4_RESOURCE_TYPES, is_resource_type};
pub use tree::{Json, Number, Object};
pub use typed::{TypedCheck, typed_check};
pub use validate::{is_valid_id, validate_resource};

/// The FHIR version Chartline speaks on the wire.
pub const FHIR_VERSION: &str = "4.0.1";

/// The shared fixtures folder for this crate's tests (`CHARTLINE_FIXTURES` overrides it).
#[cfg(test)]
pub(crate) fn test_fixtures() -> std::path::PathBuf {
    std::env::var_os("CHARTLINE_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"))
}
