//! Audit: verify the provenance hash chain and replay outputs.

use chartline_proto::v1::ReplayResponse;
use chartline_proto::v1::inference_service_client::InferenceServiceClient;
use chartline_proto::v1::timeline_service_client::TimelineServiceClient;
use chartline_store::{Store, StoreError};
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::summary::{fetch_images, generate, images_from_json, parameters_from_json};

/// The first row that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Chain position.
    pub seq: i64,
    /// The output of that row.
    pub output_id: Uuid,
    /// What did not match.
    pub reason: &'static str,
}

/// The result of verifying the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Rows examined (all of them when the chain is intact).
    pub rows_checked: u64,
    /// The first broken row.
    pub broken: Option<Broken>,
}

/// Audit operations.
#[derive(Clone)]
pub struct Audit {
    store: Store,
    timeline: TimelineServiceClient<Channel>,
    inference: InferenceServiceClient<Channel>,
}

impl Audit {
    /// Audit over `store`, replaying through `inference` with images read back through
    /// `timeline`.
    pub fn new(store: Store, timeline: Channel, inference: Channel) -> Self {
        Audit {
            store,
            timeline: TimelineServiceClient::new(timeline).max_decoding_message_size(256 << 20),
            inference: InferenceServiceClient::new(inference),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Recomputes every row: its content hash from its columns, its link to the previous
    /// row, its own hash, and the hash of the output text it vouches for.
    pub async fn verify_chain(&self) -> Result<ChainReport, StoreError> {
        let rows = self.store.provenance_chain().await?;
        let mut prev = Store::chain_genesis().to_vec();
        let mut checked = 0;
        for (row, current_output_sha) in &rows {
            checked += 1;
            let content = row.content.content_sha256(row.output_id);
            let reason = if content[..] != row.content_sha256[..] {
                Some("content hash does not match the row's columns")
            } else if row.prev_hash != prev {
                Some("link to the previous row is broken")
            } else if Sha256::new().chain_update(&row.prev_hash).chain_update(content).finalize()[..] != row.row_hash[..] {
                Some("row hash does not match")
            } else if current_output_sha.as_ref().map(hex::encode).as_deref() != Some(row.content.output_sha256.as_str()) {
                Some("the output text no longer matches its recorded hash")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Ok(ChainReport { rows_checked: checked, broken: Some(Broken { seq: row.seq, output_id: row.output_id, reason }) });
            }
            prev = row.row_hash.clone();
        }
        Ok(ChainReport { rows_checked: checked, broken: None })
    }

    /// Re-runs generation from the recorded prompt and parameters.
    pub async fn replay(&self, output_id: Uuid) -> Result<ReplayResponse, Status> {
        let p = self
            .store
            .provenance_of(output_id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "storage failure");
                Status::internal("storage failure")
            })?
            .ok_or_else(|| Status::not_found("no such output"))?;
        let params = parameters_from_json(&p.content.parameters)
            .ok_or_else(|| Status::failed_precondition("the recorded parameters cannot be read back"))?;
        let used = images_from_json(&p.content.parameters)
            .ok_or_else(|| Status::failed_precondition("the recorded images cannot be read back"))?;
        let images = fetch_images(&mut self.timeline.clone(), &used).await?;
        let (text, _, model) = generate(&mut self.inference.clone(), &p.content.prompt_text, params, images).await?;
        let replayed = hex::encode(Sha256::digest(text.as_bytes()));
        Ok(ReplayResponse {
            matches: replayed == p.content.output_sha256,
            recorded_output_sha256: p.content.output_sha256.clone(),
            replayed_output_sha256: replayed,
            same_weights: model.weights_sha256 == p.content.weights_sha256,
            replayed_text: text,
        })
    }
}
