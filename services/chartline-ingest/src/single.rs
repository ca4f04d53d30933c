//! Single-resource create (`POST /fhir/{type}`) and update (`PUT /fhir/{type}/{id}`).

use std::collections::HashMap;

use chartline_fhir::{FhirError, IssueCode, parse_json, validate_resource};
use chartline_store::{IngestRecord, WriteOutcome};
use chrono::{DateTime, Utc};

use crate::prepare::{Entry, Method, Policy, apply};
use crate::{IngestError, Ingestor, Source, payload_sha256};

/// What a single-resource write did.
#[derive(Debug, Clone)]
pub struct ResourceOutcome {
    /// The resource type.
    pub resource_type: String,
    /// The logical id (assigned on create).
    pub id: String,
    /// The current version.
    pub version_id: i64,
    /// When it was stored (None when a conditional create matched an existing resource).
    pub last_updated: Option<DateTime<Utc>>,
    /// None when a conditional create matched an existing resource.
    pub outcome: Option<WriteOutcome>,
}

/// Which single-resource interaction.
#[derive(Debug, Clone)]
pub enum Interaction {
    /// Create; the type must match when given (`POST /fhir/{type}`), and `if_none_exist`
    /// makes it conditional.
    Create {
        /// The type the URL names, if any.
        resource_type: Option<String>,
        /// A search such as `identifier=system|value`.
        if_none_exist: Option<String>,
    },
    /// Create-or-update at an id.
    Update {
        /// The type the URL names.
        resource_type: String,
        /// The id the URL names.
        id: String,
    },
}

impl Ingestor {
    /// Stores one resource.
    #[tracing::instrument(skip_all, fields(channel = source.channel))]
    pub async fn ingest_resource(&self, bytes: &[u8], interaction: Interaction, source: &Source) -> Result<ResourceOutcome, IngestError> {
        let record = IngestRecord {
            sender: source.sender.clone(),
            channel: source.channel.to_owned(),
            kind: "resource".to_owned(),
            payload_bytes: bytes.len() as i64,
            payload_sha256: payload_sha256(bytes),
            rejected: 0,
        };
        let result = self.resource_inner(bytes, interaction, &record).await;
        if let Err(e) = &result {
            if let Err(log_err) = self.store.log_rejection(&record, &e.to_operation_outcome()).await {
                tracing::error!(error = %log_err, "could not log a rejected ingest");
            }
        }
        result.map_err(IngestError::logged)
    }

    async fn resource_inner(&self, bytes: &[u8], interaction: Interaction, record: &IngestRecord) -> Result<ResourceOutcome, IngestError> {
        let resource = parse_json(bytes, &self.limits)?;
        let ty = validate_resource(&resource, &self.limits)?.to_owned();
        if ty == "Bundle" && matches!(&interaction, Interaction::Create { resource_type: None, .. }) {
            return Err(FhirError::at(IssueCode::Invalid, "resourceType", "post Bundles to the base URL").into());
        }
        let method = match interaction {
            Interaction::Create { resource_type, if_none_exist } => {
                if resource_type.as_deref().is_some_and(|t| t != ty) {
                    return Err(FhirError::at(IssueCode::Invalid, "resourceType", "resourceType differs from the type in the URL").into());
                }
                Method::Post { if_none_exist }
            }
            Interaction::Update { resource_type, id } => {
                if resource_type != ty {
                    return Err(FhirError::at(IssueCode::Invalid, "resourceType", "resourceType differs from the type in the URL").into());
                }
                match resource.get("id").and_then(|v| v.as_str()) {
                    Some(rid) if rid != id => {
                        return Err(FhirError::at(IssueCode::Invalid, format!("{ty}.id"), "the resource id differs from the id in the URL").into());
                    }
                    None => {
                        return Err(FhirError::at(IssueCode::Required, format!("{ty}.id"), "an update must carry the id of the URL in the resource").into());
                    }
                    _ => {}
                }
                Method::Put { id }
            }
        };
        let entry = Entry { index: 0, location: ty.clone(), full_url: None, resource_type: ty, method, resource: Some(resource) };
        let mut attempt = 0;
        loop {
            let mut tx = self.store.begin().await?;
            let ingest_id = tx.log_ingest(record).await?;
            match apply(&mut tx, vec![entry.clone()], &mut HashMap::new(), &Policy { literal_refs_must_exist: false }, Some(ingest_id)).await {
                Ok(mut results) => {
                    let r = results.pop().ok_or_else(|| IngestError::invalid(IssueCode::Exception, "no result"))?;
                    let writes: Vec<chartline_store::WriteResult> = r
                        .outcome
                        .map(|o| chartline_store::WriteResult {
                            resource_type: r.resource_type.clone(),
                            id: r.id.clone(),
                            version_id: r.version_id,
                            last_updated: r.last_updated.unwrap_or_default(),
                            outcome: o,
                        })
                        .into_iter()
                        .collect();
                    tx.finish_ingest(ingest_id, &writes, 0, None).await?;
                    tx.commit().await?;
                    return Ok(ResourceOutcome {
                        resource_type: r.resource_type,
                        id: r.id,
                        version_id: r.version_id,
                        last_updated: r.last_updated,
                        outcome: r.outcome,
                    });
                }
                Err(IngestError::Store(s)) if s.is_retryable() && attempt < 2 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }
}
