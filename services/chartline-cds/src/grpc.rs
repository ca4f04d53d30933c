//! gRPC faces: `SummaryService` and `AuditService`.

use chartline_proto::v1::audit_service_server::{AuditService, AuditServiceServer};
use chartline_proto::v1::summary_service_server::{SummaryService, SummaryServiceServer};
use chartline_proto::v1::{
    CitedStatement, GetLatestSummaryRequest, GetProvenanceRequest, ListOutputsRequest, ListOutputsResponse, ModelIdentity,
    ProvenanceRecord, ReplayRequest, ReplayResponse, ResourceRef, SummarizeRequest, Summary, SummarySection, VerifyChainRequest,
    VerifyChainResponse,
};
use chartline_store::{OutputFilter, OutputRow, ProvenanceRow};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::audit::{Audit, ChainReport};
use crate::summary::{Summarizer, TASK};

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn from_ts(t: &prost_types::Timestamp, field: &str) -> Result<DateTime<Utc>, Status> {
    let nanos = u32::try_from(t.nanos).map_err(|_| Status::invalid_argument(format!("{field} has negative nanos")))?;
    DateTime::from_timestamp(t.seconds, nanos).ok_or_else(|| Status::invalid_argument(format!("{field} is out of range")))
}

/// The wire form of a provenance row.
pub fn provenance_record(p: &ProvenanceRow) -> ProvenanceRecord {
    let c = &p.content;
    ProvenanceRecord {
        output_id: p.output_id.to_string(),
        chain_seq: p.seq,
        model: Some(ModelIdentity {
            name: c.model_name.clone(),
            backend: c.backend.clone(),
            weights_sha256: c.weights_sha256.clone(),
            tokenizer_sha256: c.tokenizer_sha256.clone(),
            context_length: 0,
        }),
        template_version: c.template_version.clone(),
        prompt_sha256: c.prompt_sha256.clone(),
        prompt_text: c.prompt_text.clone(),
        inputs: c
            .inputs
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| ResourceRef {
                resource_type: i["resource_type"].as_str().unwrap_or_default().to_owned(),
                id: i["id"].as_str().unwrap_or_default().to_owned(),
                version_id: i["version_id"].as_i64().unwrap_or_default(),
            })
            .collect(),
        parameters_json: c.parameters.to_string(),
        requester: c.requester.clone(),
        started_at: Some(ts(c.started_at)),
        finished_at: Some(ts(c.finished_at)),
        latency_ms: c.latency_ms,
        output_sha256: c.output_sha256.clone(),
        content_sha256: hex::encode(&p.content_sha256),
        prev_hash: hex::encode(&p.prev_hash),
        row_hash: hex::encode(&p.row_hash),
    }
}

/// The wire form of an output and its provenance.
pub fn summary(o: &OutputRow, p: &ProvenanceRow) -> Summary {
    let str_of = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Summary {
        output_id: o.id.to_string(),
        patient_id: o.patient_id.clone(),
        narrative: o.narrative.clone(),
        sections: o
            .sections
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| SummarySection { key: str_of(s, "key"), title: str_of(s, "title"), loinc: str_of(s, "loinc"), text: str_of(s, "text") })
            .collect(),
        statements: o
            .statements
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| CitedStatement {
                text: str_of(s, "text"),
                citations: s["citations"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_owned)).collect(),
                unverified: s["unverified"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_owned)).collect(),
                supported: s["supported"].as_bool().unwrap_or(false),
            })
            .collect(),
        citations_found: o.citations_found as u32,
        citations_verified: o.citations_verified as u32,
        unsupported_statements: o.unsupported_statements as u32,
        finish_reason: o.finish_reason.clone(),
        provenance: Some(provenance_record(p)),
        created_at: Some(ts(o.created_at)),
    }
}

fn output_id(s: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s).map_err(|_| Status::invalid_argument("output_id must be a UUID"))
}

fn internal(e: chartline_store::StoreError) -> Status {
    tracing::error!(error = %e, "storage failure");
    Status::internal("storage failure")
}

/// `SummaryService` over a [`Summarizer`].
#[derive(Clone)]
pub struct SummaryGrpc {
    summarizer: Summarizer,
}

/// The tonic server for `SummaryService`.
pub fn summary_server(summarizer: Summarizer) -> SummaryServiceServer<SummaryGrpc> {
    SummaryServiceServer::new(SummaryGrpc { summarizer })
}

impl SummaryGrpc {
    async fn load(&self, id: Uuid) -> Result<Summary, Status> {
        let store = self.summarizer.store();
        let o = store.output(id).await.map_err(internal)?.ok_or_else(|| Status::not_found("no such output"))?;
        let p = store.provenance_of(id).await.map_err(internal)?.ok_or_else(|| Status::internal("output without provenance"))?;
        Ok(summary(&o, &p))
    }
}

#[tonic::async_trait]
impl SummaryService for SummaryGrpc {
    async fn summarize(&self, request: Request<SummarizeRequest>) -> Result<Response<Summary>, Status> {
        let req = request.into_inner();
        if req.patient_id.is_empty() {
            return Err(Status::invalid_argument("patient_id is required"));
        }
        let requester = if req.requester.trim().is_empty() { "anonymous".to_owned() } else { req.requester.chars().take(200).collect() };
        let stored = self.summarizer.summarize(&req.patient_id, &requester, None).await?;
        Ok(Response::new(self.load(stored.output_id).await?))
    }

    async fn get_latest_summary(&self, request: Request<GetLatestSummaryRequest>) -> Result<Response<Summary>, Status> {
        let req = request.into_inner();
        let o = self
            .summarizer
            .store()
            .latest_output(&req.patient_id, TASK)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found("no summary for this patient yet"))?;
        Ok(Response::new(self.load(o.id).await?))
    }
}

/// `AuditService` over an [`Audit`].
#[derive(Clone)]
pub struct AuditGrpc {
    audit: Audit,
}

/// The tonic server for `AuditService`.
pub fn audit_server(audit: Audit) -> AuditServiceServer<AuditGrpc> {
    AuditServiceServer::new(AuditGrpc { audit })
}

/// The wire form of a chain report.
pub fn chain_response(r: &ChainReport) -> VerifyChainResponse {
    VerifyChainResponse {
        ok: r.broken.is_none(),
        rows_checked: r.rows_checked,
        first_broken_seq: r.broken.as_ref().map_or(0, |b| b.seq),
        first_broken_output_id: r.broken.as_ref().map(|b| b.output_id.to_string()).unwrap_or_default(),
        reason: r.broken.as_ref().map(|b| b.reason.to_owned()).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl AuditService for AuditGrpc {
    async fn list_outputs(&self, request: Request<ListOutputsRequest>) -> Result<Response<ListOutputsResponse>, Status> {
        let req = request.into_inner();
        if req.limit > 1000 {
            return Err(Status::invalid_argument("limit must be at most 1000"));
        }
        let filter = OutputFilter {
            patient_id: (!req.patient_id.is_empty()).then_some(req.patient_id),
            model_name: (!req.model_name.is_empty()).then_some(req.model_name),
            from: req.from.as_ref().map(|t| from_ts(t, "from")).transpose()?,
            to: req.to.as_ref().map(|t| from_ts(t, "to")).transpose()?,
            limit: i64::from(req.limit),
        };
        let rows = self.audit.store().list_outputs(&filter).await.map_err(internal)?;
        Ok(Response::new(ListOutputsResponse { outputs: rows.iter().map(|(o, p)| summary(o, p)).collect() }))
    }

    async fn get_provenance(&self, request: Request<GetProvenanceRequest>) -> Result<Response<ProvenanceRecord>, Status> {
        let id = output_id(&request.into_inner().output_id)?;
        let p = self.audit.store().provenance_of(id).await.map_err(internal)?.ok_or_else(|| Status::not_found("no such output"))?;
        Ok(Response::new(provenance_record(&p)))
    }

    async fn verify_chain(&self, _request: Request<VerifyChainRequest>) -> Result<Response<VerifyChainResponse>, Status> {
        let report = self.audit.verify_chain().await.map_err(internal)?;
        Ok(Response::new(chain_response(&report)))
    }

    async fn replay(&self, request: Request<ReplayRequest>) -> Result<Response<ReplayResponse>, Status> {
        let id = output_id(&request.into_inner().output_id)?;
        Ok(Response::new(self.audit.replay(id).await?))
    }
}
