//! FHIR ingest: the R4 transaction/batch rules, single-resource create and update, Bulk
//! Data NDJSON, and the two faces that expose them (gRPC `IngestService`, FHIR REST).
//!
//! Every path validates first (`chartline-fhir`), then writes through one
//! `chartline-store` transaction, so a rejected request stores nothing.

mod bundle;
mod error;
pub mod grpc;
mod ndjson;
mod prepare;
mod single;
pub mod rest;

use chartline_fhir::Limits;
use chartline_store::Store;

pub use bundle::BundleResponse;
pub use error::IngestError;
pub use ndjson::{NdjsonLineError, NdjsonReport};
pub use single::{Interaction, ResourceOutcome};

/// Counts of what an ingest did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// New resources.
    pub created: u64,
    /// New versions of existing resources.
    pub updated: u64,
    /// Re-sent identical content (no new version).
    pub unchanged: u64,
    /// Entries or lines refused.
    pub rejected: u64,
}

impl Counts {
    /// Adds another count.
    pub fn add(&mut self, o: &Counts) {
        self.created += o.created;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
        self.rejected += o.rejected;
    }

    fn record(&mut self, outcome: chartline_store::WriteOutcome) {
        match outcome {
            chartline_store::WriteOutcome::Created => self.created += 1,
            chartline_store::WriteOutcome::Updated => self.updated += 1,
            chartline_store::WriteOutcome::Unchanged => self.unchanged += 1,
        }
    }

    fn as_i32(&self) -> [i32; 4] {
        [self.created, self.updated, self.unchanged, self.rejected].map(|n| i32::try_from(n).unwrap_or(i32::MAX))
    }
}

/// Who sent a request and through which face, for the ingest log.
#[derive(Debug, Clone)]
pub struct Source {
    /// Client identity (EHR client id, user, `cli`).
    pub sender: String,
    /// `rest`, `grpc`, `cli`.
    pub channel: &'static str,
}

/// The ingest engine shared by every face.
#[derive(Clone, Debug)]
pub struct Ingestor {
    store: Store,
    limits: Limits,
}

impl Ingestor {
    /// An ingestor over `store` that enforces `limits`.
    pub fn new(store: Store, limits: Limits) -> Self {
        Ingestor { store, limits }
    }

    /// The store, for read paths.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

fn payload_sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}
