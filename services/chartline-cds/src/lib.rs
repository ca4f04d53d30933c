//! The orchestrator: chart summaries with verified citations and tamper-evident provenance,
//! served as CDS Hooks cards, with the audit API.
//!
//! `summary.rs` runs one summary (timeline → model over gRPC → `citations.rs` → one
//! transaction with the provenance chain and the FHIR face from `fhir.rs`); `worker.rs`
//! makes summaries ahead of the hook from the job queue ingest fills; `hooks.rs` answers
//! the EHR from stored summaries only (never waiting for the model); `audit.rs` verifies
//! the chain and replays outputs.

pub mod audit;
pub mod citations;
pub mod fhir;
pub mod grpc;
pub mod hooks;
pub mod summary;
pub mod worker;
