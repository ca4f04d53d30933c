//! `transaction` and `batch` Bundles (FHIR R4 http.html#transaction).

use std::collections::HashMap;

use chartline_fhir::{FhirError, IssueCode, Json, parse_json, validate_resource};
use chartline_store::IngestRecord;
use serde_json::{Value, json};

use crate::prepare::{Entry, EntryResult, Method, Policy, apply, independent};
use crate::{Counts, IngestError, Ingestor, Source, payload_sha256};

/// The response to a Bundle: a `transaction-response` or `batch-response` Bundle.
#[derive(Debug, Clone)]
pub struct BundleResponse {
    /// The response Bundle as JSON text, written entry by entry (no tree is built for a
    /// several-thousand-entry answer).
    pub bundle: Vec<u8>,
    /// What was done.
    pub counts: Counts,
}

const RETRIES: usize = 3;

impl Ingestor {
    /// Ingests a `transaction` (all or nothing) or `batch` (entry by entry) Bundle.
    #[tracing::instrument(skip_all, fields(channel = source.channel, bytes = bytes.len()))]
    pub async fn ingest_bundle(&self, bytes: &[u8], source: &Source) -> Result<BundleResponse, IngestError> {
        let record = IngestRecord {
            sender: source.sender.clone(),
            channel: source.channel.to_owned(),
            kind: "bundle".to_owned(),
            payload_bytes: bytes.len() as i64,
            payload_sha256: payload_sha256(bytes),
            rejected: 0,
        };
        let result = self.ingest_bundle_inner(bytes, record.clone()).await;
        if let Err(e) = &result {
            let oo = e.to_operation_outcome();
            if let Err(log_err) = self.store.log_rejection(&record, &oo).await {
                tracing::error!(error = %log_err, "could not log a rejected ingest");
            }
            tracing::info!(code = ?e.to_operation_outcome()["issue"][0]["code"], "bundle rejected");
        }
        result.map_err(IngestError::logged)
    }

    async fn ingest_bundle_inner(&self, bytes: &[u8], mut record: IngestRecord) -> Result<BundleResponse, IngestError> {
        let bundle = parse_json(bytes, &self.limits)?;
        let ty = validate_resource(&bundle, &self.limits)?;
        if ty != "Bundle" {
            return Err(FhirError::at(IssueCode::Invalid, "resourceType", "expected a Bundle").into());
        }
        let kind = bundle.get("type").and_then(Json::as_str).unwrap_or("");
        match kind {
            "transaction" => {
                record.kind = "transaction".into();
                let mut attempt = 0;
                let mut bundle = Some(bundle);
                loop {
                    let b = match bundle.take() {
                        Some(b) => b,
                        None => parse_json(bytes, &self.limits)?,
                    };
                    let entries = parse_entries(b, true)?.into_iter().collect::<Result<Vec<_>, _>>()?;
                    match self.transaction(entries, &record).await {
                        Err(IngestError::Store(e)) if e.is_retryable() && attempt + 1 < RETRIES => {
                            attempt += 1;
                            tracing::warn!(attempt, "transaction conflicted with a concurrent one; retrying");
                        }
                        other => return other,
                    }
                }
            }
            "batch" => {
                record.kind = "batch".into();
                let entries = parse_entries(bundle, false)?;
                self.batch(entries, &record).await
            }
            _ => {
                Err(FhirError::at(
                    IssueCode::NotSupported,
                    "Bundle.type",
                    "only transaction and batch Bundles can be posted; use $import for other collections",
                )
                .into())
            }
        }
    }

    async fn transaction(&self, entries: Vec<Entry>, record: &IngestRecord) -> Result<BundleResponse, IngestError> {
        let mut tx = self.store.begin().await?;
        let ingest_id = tx.log_ingest(record).await?;
        let mut known = HashMap::new();
        let results = apply(&mut tx, entries, &mut known, &Policy { literal_refs_must_exist: true }, Some(ingest_id)).await?;
        let mut counts = Counts::default();
        let writes: Vec<chartline_store::WriteResult> =
            results.iter().filter_map(|r| r.outcome.map(|o| write_result(r, o))).collect();
        for r in &results {
            if let Some(o) = r.outcome {
                counts.record(o);
            }
        }
        tx.finish_ingest(ingest_id, &writes, 0, None).await?;
        tx.commit().await?;
        let mut sorted = results;
        sorted.sort_by_key(|r| r.index);
        let mut bundle = ResponseBundle::new("transaction-response", sorted.len());
        for r in &sorted {
            bundle.push_result(r);
        }
        tracing::info!(created = counts.created, updated = counts.updated, unchanged = counts.unchanged, "transaction stored");
        Ok(BundleResponse { bundle: bundle.finish(), counts })
    }

    /// A batch: entries succeed or fail one by one. They share one database transaction with
    /// a savepoint per entry (one commit instead of one per entry); a failing entry rolls
    /// back to its savepoint only. A deadlock retries the whole batch, which nothing saw yet.
    async fn batch(&self, entries: Vec<Result<Entry, FhirError>>, record: &IngestRecord) -> Result<BundleResponse, IngestError> {
        let mut attempt = 0;
        loop {
            match self.batch_once(&entries, record).await {
                Err(IngestError::Store(e)) if e.is_retryable() && attempt + 1 < RETRIES => attempt += 1,
                other => return other,
            }
        }
    }

    async fn batch_once(&self, entries: &[Result<Entry, FhirError>], record: &IngestRecord) -> Result<BundleResponse, IngestError> {
        let mut tx = self.store.begin().await?;
        let ingest_id = tx.log_ingest(record).await?;
        let mut known = HashMap::new();
        let mut counts = Counts::default();
        let mut out = ResponseBundle::new("batch-response", entries.len());
        let mut issues = Vec::new();
        let mut writes = Vec::new();
        let policy = Policy { literal_refs_must_exist: false };

        // The common case, a batch of valid and independent entries, in one pass (a few
        // statements for the whole batch). Should any entry fail, the pass is undone and
        // the entries go one by one below, so each fails or succeeds on its own.
        let mut outcomes: Vec<Result<Vec<EntryResult>, IngestError>> = Vec::with_capacity(entries.len());
        let group: Option<Vec<Entry>> = entries.iter().map(|e| e.as_ref().ok().cloned()).collect();
        if let Some(group) = group.filter(|g| g.len() > 1 && independent(g)) {
            tx.savepoint().await?;
            match apply(&mut tx, group, &mut known, &policy, Some(ingest_id)).await {
                Ok(results) => {
                    tx.release_savepoint().await?;
                    outcomes.extend(results.into_iter().map(|r| Ok(vec![r])));
                }
                Err(IngestError::Store(s)) => return Err(IngestError::Store(s)),
                Err(_) => {
                    tx.rollback_to_savepoint().await?;
                    known.clear();
                }
            }
        }
        if outcomes.is_empty() {
            for entry in entries {
                outcomes.push(match entry {
                    Ok(e) => {
                        tx.savepoint().await?;
                        let mut local = known.clone();
                        match apply(&mut tx, vec![e.clone()], &mut local, &policy, Some(ingest_id)).await {
                            Ok(r) => {
                                tx.release_savepoint().await?;
                                known = local;
                                Ok(r)
                            }
                            Err(IngestError::Store(s)) => return Err(IngestError::Store(s)),
                            Err(err) => {
                                tx.rollback_to_savepoint().await?;
                                Err(err)
                            }
                        }
                    }
                    Err(f) => Err(IngestError::Invalid(f.clone())),
                });
            }
        }
        for result in outcomes {
            match result {
                Ok(results) => {
                    for r in &results {
                        if let Some(o) = r.outcome {
                            counts.record(o);
                            writes.push(write_result(r, o));
                        }
                        out.push_result(r);
                    }
                }
                Err(e) => {
                    counts.rejected += 1;
                    let oo = e.to_operation_outcome();
                    issues.extend(oo["issue"].as_array().cloned().unwrap_or_default());
                    out.push_failure(e.http_status(), &oo);
                }
            }
        }
        let issues = (!issues.is_empty()).then(|| json!({"resourceType": "OperationOutcome", "issue": issues}));
        tx.finish_ingest(ingest_id, &writes, i32::try_from(counts.rejected).unwrap_or(i32::MAX), issues.as_ref()).await?;
        tx.commit().await?;
        tracing::info!(created = counts.created, updated = counts.updated, unchanged = counts.unchanged, rejected = counts.rejected, "batch processed");
        Ok(BundleResponse { bundle: out.finish(), counts })
    }
}

/// Reads the entries' requests. For a transaction the first bad entry fails the whole
/// Bundle; for a batch each bad entry fails alone.
fn parse_entries(mut bundle: Json, transaction: bool) -> Result<Vec<Result<Entry, FhirError>>, FhirError> {
    // Entries are moved out of the Bundle, not copied: a 3,000-resource Bundle is large.
    let Some(Json::Array(entries)) = bundle.get_mut("entry").map(Json::take) else { return Ok(Vec::new()) };
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_vec().into_iter().enumerate() {
        let entry = parse_entry(i, e);
        if transaction {
            out.push(Ok(entry?));
        } else {
            out.push(entry);
        }
    }
    Ok(out)
}

fn parse_entry(i: usize, mut e: Json) -> Result<Entry, FhirError> {
    let location = format!("Bundle.entry[{i}]");
    let request = e
        .get_mut("request")
        .map(Json::take)
        .ok_or_else(|| FhirError::at(IssueCode::Required, format!("{location}.request"), "entry.request is required in a transaction or batch"))?;
    let method = request.get("method").and_then(Json::as_str).unwrap_or("");
    let url = request.get("url").and_then(Json::as_str).unwrap_or("");
    if url.is_empty() {
        return Err(FhirError::at(IssueCode::Required, format!("{location}.request.url"), "entry.request.url is required"));
    }
    let resource = e.get_mut("resource").map(Json::take);
    let rtype_of_resource = resource.as_ref().and_then(|r| r.get("resourceType")).and_then(Json::as_str).map(str::to_owned);
    let path = url.split('?').next().unwrap_or("").trim_matches('/');
    let query = url.split_once('?').map(|(_, q)| q.to_owned());
    let mut segments = path.split('/');
    let url_type = segments.next().unwrap_or("").to_owned();
    let url_id = segments.next().map(str::to_owned);
    if !chartline_fhir::is_resource_type(&url_type) {
        return Err(FhirError::at(IssueCode::Invalid, format!("{location}.request.url"), "request.url must start with a resource type"));
    }
    if let Some(rt) = &rtype_of_resource {
        if *rt != url_type {
            return Err(FhirError::at(IssueCode::Invalid, format!("{location}.request.url"), "request.url names another resource type than the resource"));
        }
    }
    let m = match (method, url_id, query) {
        ("POST", None, None) => Method::Post {
            if_none_exist: request.get("ifNoneExist").and_then(Json::as_str).map(|q| q.trim_start_matches('?').to_owned()),
        },
        ("PUT", Some(id), None) => {
            if !chartline_fhir::is_valid_id(&id) {
                return Err(FhirError::at(IssueCode::Invalid, format!("{location}.request.url"), "request.url holds an invalid id"));
            }
            if let Some(rid) = resource.as_ref().and_then(|r| r.get("id")).and_then(Json::as_str) {
                if rid != id {
                    return Err(FhirError::at(IssueCode::Invalid, format!("{location}.resource.id"), "resource.id differs from the id in request.url"));
                }
            }
            Method::Put { id }
        }
        ("PUT", None, Some(q)) => Method::ConditionalPut { query: q },
        ("DELETE", Some(id), None) => Method::Delete { id },
        ("GET" | "HEAD" | "PATCH", _, _) | ("DELETE", None, Some(_)) => {
            return Err(FhirError::at(
                IssueCode::NotSupported,
                format!("{location}.request.method"),
                "GET, HEAD, PATCH and conditional DELETE entries are not supported",
            ));
        }
        _ => {
            return Err(FhirError::at(
                IssueCode::Invalid,
                format!("{location}.request"),
                "request.method and request.url do not form a valid interaction",
            ));
        }
    };
    if resource.is_none() && !matches!(m, Method::Delete { .. }) {
        return Err(FhirError::at(IssueCode::Required, format!("{location}.resource"), "entry.resource is required for POST and PUT"));
    }
    Ok(Entry {
        index: i,
        location,
        full_url: e.get("fullUrl").and_then(Json::as_str).map(str::to_owned),
        resource_type: url_type,
        method: m,
        resource,
    })
}

fn write_result(r: &EntryResult, outcome: chartline_store::WriteOutcome) -> chartline_store::WriteResult {
    chartline_store::WriteResult {
        resource_type: r.resource_type.clone(),
        id: r.id.clone(),
        version_id: r.version_id,
        last_updated: r.last_updated.unwrap_or_default(),
        outcome,
    }
}

/// A `transaction-response` or `batch-response` Bundle, written as JSON text one entry at
/// a time. Strings go through serde_json's escaping; ids and types are validated already.
struct ResponseBundle {
    out: Vec<u8>,
    entries: usize,
}

impl ResponseBundle {
    fn new(kind: &str, entries: usize) -> Self {
        let mut out = Vec::with_capacity(64 + entries * 200);
        out.extend_from_slice(b"{\"resourceType\":\"Bundle\",\"type\":");
        push_str(&mut out, kind);
        ResponseBundle { out, entries: 0 }
    }

    /// FHIR JSON has no empty arrays: `entry` opens with the first entry.
    fn next_entry(&mut self) {
        self.out.extend_from_slice(if self.entries == 0 { &b",\"entry\":["[..] } else { b"," });
        self.entries += 1;
    }

    /// `{"fullUrl": "Type/id", "response": {status, location, etag, lastModified}}`.
    fn push_result(&mut self, r: &EntryResult) {
        self.next_entry();
        let o = &mut self.out;
        o.extend_from_slice(b"{\"fullUrl\":");
        push_str(o, &format!("{}/{}", r.resource_type, r.id));
        o.extend_from_slice(b",\"response\":{\"status\":");
        push_str(o, r.status);
        o.extend_from_slice(b",\"location\":");
        if r.version_id > 0 {
            push_str(o, &format!("{}/{}/_history/{}", r.resource_type, r.id, r.version_id));
            o.extend_from_slice(b",\"etag\":");
            push_str(o, &format!("W/\"{}\"", r.version_id));
        } else {
            push_str(o, &format!("{}/{}", r.resource_type, r.id));
        }
        if let Some(t) = r.last_updated {
            o.extend_from_slice(b",\"lastModified\":");
            push_str(o, &t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        }
        o.extend_from_slice(b"}}");
    }

    /// `{"response": {"status": "...", "outcome": OperationOutcome}}` for a failed entry.
    fn push_failure(&mut self, http_status: u16, outcome: &Value) {
        self.next_entry();
        let o = &mut self.out;
        o.extend_from_slice(b"{\"response\":{\"status\":");
        push_str(o, &status_line(http_status));
        o.extend_from_slice(b",\"outcome\":");
        // A Value always serializes (its map keys are strings).
        let _ = serde_json::to_writer(&mut *o, outcome);
        o.extend_from_slice(b"}}");
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(if self.entries == 0 { &b"}"[..] } else { b"]}" });
        self.out
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

pub(crate) fn status_line(code: u16) -> String {
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        _ => "Internal Server Error",
    };
    format!("{code} {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, version_id: i64, last_updated: bool, status: &'static str) -> EntryResult {
        EntryResult {
            index: 0,
            resource_type: "Patient".into(),
            id: id.into(),
            version_id,
            last_updated: last_updated.then(|| chrono::DateTime::from_timestamp(1_764_460_800, 123_456_000).unwrap_or_default()),
            outcome: None,
            status,
        }
    }

    #[test]
    fn the_response_bundle_text_is_the_json_of_its_entries() {
        let outcome = FhirError::at(IssueCode::Invalid, "Patient.birthDate", "a \"quoted\" message\nover two lines").to_operation_outcome();
        let mut b = ResponseBundle::new("batch-response", 3);
        b.push_result(&result("p1", 2, true, "201 Created"));
        b.push_failure(422, &outcome);
        b.push_result(&result("p-2.x", 0, false, "200 OK"));
        let parsed: Value = serde_json::from_slice(&b.finish()).expect("the response is JSON");
        assert_eq!(
            parsed,
            json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
                {"fullUrl": "Patient/p1", "response": {"status": "201 Created", "location": "Patient/p1/_history/2",
                    "etag": "W/\"2\"", "lastModified": "2025-11-30T00:00:00.123456Z"}},
                {"response": {"status": "422 Unprocessable Entity", "outcome": outcome}},
                {"fullUrl": "Patient/p-2.x", "response": {"status": "200 OK", "location": "Patient/p-2.x"}},
            ]})
        );
        let empty: Value = serde_json::from_slice(&ResponseBundle::new("transaction-response", 0).finish()).expect("JSON");
        assert_eq!(empty, json!({"resourceType": "Bundle", "type": "transaction-response"}));
    }
}
