//! Bulk Data NDJSON: one resource a line, any number of lines, streamed. Each line stands
//! alone: a bad line is reported and skipped, the others are stored.

use std::collections::HashMap;

use bytes::Bytes;
use chartline_fhir::{FhirError, IssueCode, parse_json, validate_resource};
use chartline_store::IngestRecord;
use futures::{Stream, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::prepare::{Entry, Method, Policy, apply};
use crate::{Counts, IngestError, Ingestor, Source};

/// Lines written per database transaction.
const GROUP: usize = 500;
/// Line errors reported back at most (all are counted).
const MAX_REPORTED_ERRORS: usize = 100;

/// A rejected NDJSON line.
#[derive(Debug, Clone)]
pub struct NdjsonLineError {
    /// 1-based line number.
    pub line: u64,
    /// Why, as an OperationOutcome.
    pub outcome: Value,
}

/// What an NDJSON import did.
#[derive(Debug, Clone, Default)]
pub struct NdjsonReport {
    /// Counts over all lines.
    pub counts: Counts,
    /// The first rejected lines.
    pub errors: Vec<NdjsonLineError>,
}

impl NdjsonReport {
    fn reject(&mut self, line: u64, e: &IngestError) {
        self.counts.rejected += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(NdjsonLineError { line, outcome: e.to_operation_outcome() });
        }
    }
}

impl Ingestor {
    /// Imports NDJSON from a stream of chunks (lines may span chunks). Fails as a whole only
    /// when the stream or the database fails; bad lines are reported in the result.
    #[tracing::instrument(skip_all, fields(channel = source.channel))]
    pub async fn ingest_ndjson<S, E>(&self, mut chunks: S, source: &Source) -> Result<NdjsonReport, IngestError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut record = IngestRecord {
            sender: source.sender.clone(),
            channel: source.channel.to_owned(),
            kind: "ndjson".to_owned(),
            payload_bytes: 0,
            payload_sha256: [0; 32],
            rejected: 0,
        };
        let ingest_id = self.store.open_ingest(&record).await?;
        let mut report = NdjsonReport::default();
        let mut hasher = Sha256::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut group: Vec<(u64, Entry)> = Vec::with_capacity(GROUP);
        let mut line_no = 0u64;
        let mut total = 0usize;
        let mut stream_error = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "ndjson stream broke off");
                    stream_error = Some(FhirError::new(IssueCode::Incomplete, "the NDJSON stream broke off; lines read before were processed"));
                    break;
                }
            };
            hasher.update(&chunk);
            total += chunk.len();
            pending.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
                line_no += 1;
                let line = &pending[start..start + nl];
                start += nl + 1;
                self.take_line(line_no, line, &mut group, &mut report);
                if group.len() >= GROUP {
                    self.flush(&mut group, &mut report, ingest_id).await?;
                }
            }
            pending.drain(..start);
            if pending.len() > self.limits.max_bytes {
                line_no += 1;
                report.reject(line_no, &IngestError::invalid(IssueCode::TooLong, "an NDJSON line is over the payload limit"));
                stream_error = Some(FhirError::new(IssueCode::TooLong, "an NDJSON line is over the payload limit; import stopped there"));
                pending.clear();
                break;
            }
        }
        if stream_error.is_none() && !pending.is_empty() {
            line_no += 1;
            let line = std::mem::take(&mut pending);
            self.take_line(line_no, &line, &mut group, &mut report);
        }
        self.flush(&mut group, &mut report, ingest_id).await?;
        record.payload_bytes = total as i64;
        record.payload_sha256 = hasher.finalize().into();
        let issues = (!report.errors.is_empty()).then(|| {
            let issues: Vec<Value> = report
                .errors
                .iter()
                .flat_map(|e| e.outcome["issue"].as_array().cloned().unwrap_or_default())
                .collect();
            serde_json::json!({"resourceType": "OperationOutcome", "issue": issues})
        });
        self.store.close_ingest(ingest_id, report.counts.as_i32(), issues.as_ref()).await?;
        tracing::info!(
            lines = line_no,
            created = report.counts.created,
            updated = report.counts.updated,
            unchanged = report.counts.unchanged,
            rejected = report.counts.rejected,
            "ndjson import done"
        );
        if let Some(e) = stream_error {
            report.reject(line_no + 1, &IngestError::Invalid(e));
        }
        Ok(report)
    }

    fn take_line(&self, line_no: u64, line: &[u8], group: &mut Vec<(u64, Entry)>, report: &mut NdjsonReport) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match parse_line(line_no, line, &self.limits) {
            Ok(entry) => group.push((line_no, entry)),
            Err(e) => report.reject(line_no, &e),
        }
    }

    async fn flush(&self, group: &mut Vec<(u64, Entry)>, report: &mut NdjsonReport, ingest_id: i64) -> Result<(), IngestError> {
        if group.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(group);
        let policy = Policy { literal_refs_must_exist: false };
        // The whole group in one transaction; if any line makes it fail, line by line.
        let mut tx = self.store.begin().await?;
        match apply(&mut tx, items.iter().map(|(_, e)| e.clone()).collect(), &mut HashMap::new(), &policy, Some(ingest_id)).await {
            Ok(results) => {
                tx.commit().await?;
                for r in results {
                    if let Some(o) = r.outcome {
                        report.counts.record(o);
                    }
                }
                return Ok(());
            }
            Err(IngestError::Store(e)) if !e.is_retryable() => return Err(IngestError::Store(e)),
            Err(_) => drop(tx),
        }
        for (line, entry) in items {
            let mut tx = self.store.begin().await?;
            match apply(&mut tx, vec![entry], &mut HashMap::new(), &policy, Some(ingest_id)).await {
                Ok(results) => {
                    tx.commit().await?;
                    for r in results {
                        if let Some(o) = r.outcome {
                            report.counts.record(o);
                        }
                    }
                }
                Err(IngestError::Store(e)) if !e.is_retryable() => return Err(IngestError::Store(e)),
                Err(e) => report.reject(line, &e),
            }
        }
        Ok(())
    }
}

fn parse_line(line_no: u64, line: &[u8], limits: &chartline_fhir::Limits) -> Result<Entry, IngestError> {
    let v = parse_json(line, limits)?;
    let ty = validate_resource(&v, limits)?.to_owned();
    if ty == "Bundle" {
        return Err(IngestError::invalid(IssueCode::NotSupported, "Bundles inside NDJSON are not imported; post them to /fhir"));
    }
    let method = match v.get("id").and_then(chartline_fhir::Json::as_str) {
        Some(id) => Method::Put { id: id.to_owned() },
        None => Method::Post { if_none_exist: None },
    };
    Ok(Entry { index: line_no as usize, location: format!("line {line_no}"), full_url: None, resource_type: ty, method, resource: Some(v) })
}
