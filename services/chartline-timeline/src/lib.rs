//! The longitudinal patient timeline and the prompts built from it.
//!
//! [`Timeline::events`] is one indexed SELECT over `patient_event`; [`Timeline::build_prompt`]
//! turns those rows (plus the Patient resource and the newest notes) into IPS-shaped
//! sections where every line carries its source tag, cut to a token budget counted by the
//! model's own tokenizer ([`TokenCounter`]), dropping lines by a documented priority
//! (see `prompt.rs`). The same data, task, budget and `as_of` give byte-identical text.
//!
//! Images (`images.rs`): the image attachments of DocumentReference, Media and
//! DiagnosticReport are Imaging lines; [`Timeline::build_prompt_with`] attaches the newest
//! retrievable ones (`<start_of_image>` after their line, [`PromptImage`] in the prompt)
//! and [`Timeline::attachment`] returns an attachment's bytes.

pub mod grpc;
mod images;
mod prompt;
mod sections;

use std::sync::Arc;

use chartline_store::{EventFilter, EventRow, Store, StoreError};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use images::{ATTACHMENT_TYPES, IMAGE_CONTENT_TYPES};
pub use prompt::{
    Citation, DEFAULT_IMAGE_TOKENS, IMAGE_PLACEHOLDER, IMAGES_OMITTED_KEY, Prompt, PromptImage, Section, TEMPLATE_VERSION,
    prompt_sha256,
};
pub use sections::Task;

/// Counts tokens exactly as the model that will read the prompt does. Implemented by the
/// inference crate's tokenizer; the timeline never guesses by characters.
pub trait TokenCounter: Send + Sync {
    /// Tokens in `text` (no BOS, no chat template).
    fn count(&self, text: &str) -> usize;
    /// Which tokenizer (name and sha256), for provenance.
    fn describe(&self) -> String;
}

/// Why a timeline request failed.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// No such patient.
    #[error("patient not found")]
    NotFound,
    /// A request field is out of range, or stored data is malformed; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such resource, attachment or Binary; the message names which (ids only).
    #[error("{0}")]
    Missing(String),
    /// The request is well formed but cannot be served (a remote url, no data).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The attachment is over the configured size limit.
    #[error("{0}")]
    TooLarge(String),
    /// The database failed.
    #[error("storage failure")]
    Store(#[from] StoreError),
}

impl From<TimelineError> for tonic::Status {
    fn from(e: TimelineError) -> Self {
        match e {
            TimelineError::NotFound => tonic::Status::not_found("patient not found"),
            TimelineError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            TimelineError::Missing(m) => tonic::Status::not_found(m),
            TimelineError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            TimelineError::TooLarge(m) => tonic::Status::resource_exhausted(m),
            TimelineError::Store(s) => {
                tracing::error!(error = %s, "storage failure in timeline");
                tonic::Status::internal("storage failure")
            }
        }
    }
}

fn is_fhir_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A log-safe name for an error (no message: messages are for the caller).
fn error_kind(e: &TimelineError) -> &'static str {
    match e {
        TimelineError::NotFound | TimelineError::Missing(_) => "not found",
        TimelineError::InvalidArgument(_) => "invalid data",
        TimelineError::FailedPrecondition(_) => "not retrievable",
        TimelineError::TooLarge(_) => "over the size limit",
        TimelineError::Store(_) => "storage failure",
    }
}

/// Smallest and largest accepted token budgets.
pub const BUDGET_RANGE: (i64, i64) = (64, 1_000_000);
/// Notes whose text is read (newest first) when building a prompt.
const NOTES_READ: usize = 5;
/// Most images one prompt may attach.
pub const MAX_IMAGES: u32 = 32;
/// Largest accepted per-image token cost.
pub const MAX_IMAGE_TOKENS: u32 = 16_384;
/// Default limit on the bytes of one attachment ([`Timeline::with_max_attachment_bytes`]).
pub const DEFAULT_MAX_ATTACHMENT_BYTES: u64 = 32 * 1024 * 1024;

/// Prompt options beyond task, budget and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromptOptions {
    /// Images to attach (0 to [`MAX_IMAGES`]); 0 attaches none.
    pub max_images: u32,
    /// Tokens one attached image costs; 0 means [`DEFAULT_IMAGE_TOKENS`].
    pub image_tokens: u32,
}

/// An attachment's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The resource version read.
    pub source: Citation,
    /// Which attachment (as [`PromptImage::attachment_index`]).
    pub attachment_index: usize,
    /// The attachment's contentType, lower case without parameters (empty when absent).
    pub content_type: String,
    /// The bytes.
    pub data: Vec<u8>,
    /// sha256 of `data`, hex.
    pub sha256: String,
}

/// The timeline service's logic.
#[derive(Clone)]
pub struct Timeline {
    store: Store,
    counter: Arc<dyn TokenCounter>,
    max_attachment_bytes: u64,
}

impl Timeline {
    /// A timeline over `store`, counting tokens with `counter`.
    pub fn new(store: Store, counter: Arc<dyn TokenCounter>) -> Self {
        Timeline { store, counter, max_attachment_bytes: DEFAULT_MAX_ATTACHMENT_BYTES }
    }

    /// Sets the largest attachment [`Timeline::attachment`] returns and a prompt attaches.
    pub fn with_max_attachment_bytes(mut self, bytes: u64) -> Self {
        self.max_attachment_bytes = bytes;
        self
    }

    /// The attachment size limit.
    pub fn max_attachment_bytes(&self) -> u64 {
        self.max_attachment_bytes
    }

    /// The patient's events in time order.
    pub async fn events(&self, patient_id: &str, filter: &EventFilter) -> Result<Vec<EventRow>, TimelineError> {
        self.patient(patient_id).await?;
        Ok(self.store.patient_events(patient_id, filter).await?)
    }

    async fn patient(&self, patient_id: &str) -> Result<(Value, i64), TimelineError> {
        if patient_id.is_empty() || patient_id.len() > 64 {
            return Err(TimelineError::InvalidArgument("patient_id must be a FHIR id (1-64 characters)".into()));
        }
        match self.store.read("Patient", patient_id).await? {
            Some(s) => match s.content {
                Some(c) => Ok((c, s.version_id)),
                None => Err(TimelineError::NotFound),
            },
            None => Err(TimelineError::NotFound),
        }
    }

    /// Builds the prompt for `task` within `token_budget` tokens, reading the chart as of
    /// `as_of`; attaches no image.
    pub async fn build_prompt(
        &self,
        patient_id: &str,
        task: &str,
        token_budget: i64,
        as_of: DateTime<Utc>,
    ) -> Result<Prompt, TimelineError> {
        self.build_prompt_with(patient_id, task, token_budget, as_of, PromptOptions::default()).await
    }

    /// As [`Timeline::build_prompt`], attaching up to `options.max_images` images: the newest
    /// retrievable image attachments whose bytes are within the size limit, as far as the
    /// budget holds them (see `prompt.rs`).
    pub async fn build_prompt_with(
        &self,
        patient_id: &str,
        task: &str,
        token_budget: i64,
        as_of: DateTime<Utc>,
        options: PromptOptions,
    ) -> Result<Prompt, TimelineError> {
        let task = Task::parse(task)?;
        if !(BUDGET_RANGE.0..=BUDGET_RANGE.1).contains(&token_budget) {
            return Err(TimelineError::InvalidArgument(format!(
                "token_budget must be between {} and {}",
                BUDGET_RANGE.0, BUDGET_RANGE.1
            )));
        }
        if options.max_images > MAX_IMAGES {
            return Err(TimelineError::InvalidArgument(format!("max_images must be at most {MAX_IMAGES}")));
        }
        if options.image_tokens > MAX_IMAGE_TOKENS {
            return Err(TimelineError::InvalidArgument(format!("image_tokens must be at most {MAX_IMAGE_TOKENS}")));
        }
        let image_tokens = if options.image_tokens == 0 { prompt::DEFAULT_IMAGE_TOKENS } else { options.image_tokens as usize };
        // Independent reads, concurrently: the Patient, the events, the newest notes, the
        // resources holding images.
        let filter = EventFilter { to: Some(as_of), ..EventFilter::default() };
        let (patient, events, docs, image_rows) = tokio::try_join!(
            self.patient(patient_id),
            async { self.store.patient_events(patient_id, &filter).await.map_err(TimelineError::from) },
            async { self.store.newest_documents(patient_id, as_of, NOTES_READ as i64).await.map_err(TimelineError::from) },
            async {
                self.store
                    .patient_resources_matching(patient_id, images::IMAGE_KINDS, as_of, images::IMAGE_FILTER)
                    .await
                    .map_err(TimelineError::from)
            },
        )?;
        let (patient, patient_version) = patient;
        let notes = docs
            .into_iter()
            .filter(|(event, content)| event.status.as_deref() != Some("entered-in-error") && !images::entered_in_error(content))
            .filter_map(|(event, content)| sections::note_text(&content).map(|text| sections::Note { event, text }))
            .collect();
        let found = images::discover(&image_rows, |e| e.display.as_deref().or(e.code.as_deref()).map(sections::one_line));
        let mut chosen = 0;
        let mut input_images = Vec::with_capacity(found.len());
        for image in found {
            let mut resolved = None;
            if chosen < options.max_images as usize && image.retrievable() {
                let resource = image_rows
                    .iter()
                    .find(|(e, _)| e.resource_type == image.source.resource_type && e.resource_id == image.source.id)
                    .map(|(_, r)| r);
                let bytes = match resource.and_then(|r| images::attachment_at(r, image.attachment_index)) {
                    Some(a) => self.attachment_bytes(&image.source, image.attachment_index, a).await,
                    None => Err(TimelineError::Missing("attachment vanished".into())),
                };
                match bytes {
                    Ok(data) => {
                        chosen += 1;
                        resolved = Some(images::Resolved { size: data.len() as u64, sha256: hex::encode(Sha256::digest(&data)) });
                    }
                    Err(e @ TimelineError::Store(_)) => return Err(e),
                    // Not attachable (Binary not stored, over the limit, bad data): listed only.
                    Err(e) => tracing::debug!(
                        resource_type = %image.source.resource_type,
                        id = %image.source.id,
                        attachment = image.attachment_index,
                        reason = %error_kind(&e),
                        "image not attachable"
                    ),
                }
            }
            input_images.push(sections::InputImage { image, resolved });
        }
        let input = sections::Input { patient: &patient, patient_version, events: &events, notes, images: input_images, as_of };
        let p = prompt::build(&input, task, token_budget as usize, image_tokens, self.counter.as_ref())?;
        tracing::debug!(
            patient_id,
            images_listed = input.images.len(),
            images_chosen = chosen,
            images_attached = p.images.len(),
            "prompt built"
        );
        Ok(p)
    }

    /// The bytes of attachment `attachment_index` of a DocumentReference, Media or
    /// DiagnosticReport (`version` None reads the current one): inline data or the stored
    /// Binary its url names. Errors: [`TimelineError::Missing`] (no such resource, index or
    /// Binary), [`TimelineError::FailedPrecondition`] (remote url, no data, entered in
    /// error), [`TimelineError::TooLarge`], [`TimelineError::InvalidArgument`] (bad
    /// request or base64).
    pub async fn attachment(
        &self,
        resource_type: &str,
        id: &str,
        version: Option<i64>,
        attachment_index: usize,
    ) -> Result<Attachment, TimelineError> {
        if !ATTACHMENT_TYPES.contains(&resource_type) {
            return Err(TimelineError::InvalidArgument(format!(
                "source.resource_type must be one of: {}",
                ATTACHMENT_TYPES.join(", ")
            )));
        }
        if !is_fhir_id(id) {
            return Err(TimelineError::InvalidArgument("source.id must be a FHIR id (1-64 characters)".into()));
        }
        if version.is_some_and(|v| v < 1) {
            return Err(TimelineError::InvalidArgument("source.version_id must be 0 (current) or a version".into()));
        }
        let stored = match version {
            Some(v) => self.store.read_version(resource_type, id, v).await?,
            None => self.store.read(resource_type, id).await?,
        };
        let what = match version {
            Some(v) => format!("{resource_type}/{id}/_history/{v}"),
            None => format!("{resource_type}/{id}"),
        };
        let Some(stored) = stored else { return Err(TimelineError::Missing(format!("{what} not found"))) };
        let Some(content) = stored.content else { return Err(TimelineError::Missing(format!("{what} is deleted"))) };
        if images::entered_in_error(&content) {
            return Err(TimelineError::FailedPrecondition(format!("{what} is entered-in-error")));
        }
        let Some(a) = images::attachment_at(&content, attachment_index) else {
            return Err(TimelineError::Missing(format!("{what} has no attachment {attachment_index}")));
        };
        let source = Citation { resource_type: stored.resource_type, id: stored.id, version_id: stored.version_id };
        let data = self.attachment_bytes(&source, attachment_index, a).await?;
        let content_type = a.get("contentType").and_then(serde_json::Value::as_str).map(images::media_type).unwrap_or_default();
        let sha256 = hex::encode(Sha256::digest(&data));
        tracing::debug!(resource_type, id, attachment = attachment_index, bytes = data.len(), "attachment read");
        Ok(Attachment { source, attachment_index, content_type, data, sha256 })
    }

    /// The bytes of one attachment of `source`, within the size limit.
    async fn attachment_bytes(
        &self,
        source: &Citation,
        index: usize,
        attachment: &serde_json::Value,
    ) -> Result<Vec<u8>, TimelineError> {
        let at = format!("{}/{} attachment {index}", source.resource_type, source.id);
        let (data, from) = match images::location(attachment) {
            images::Location::Inline => {
                (attachment.get("data").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned(), at.clone())
            }
            images::Location::Binary { id, version, absolute } => {
                let stored = match version {
                    Some(v) => self.store.read_version("Binary", &id, v).await?,
                    None => self.store.read("Binary", &id).await?,
                };
                let content = match stored.and_then(|s| s.content) {
                    Some(c) => c,
                    None if absolute => {
                        return Err(TimelineError::FailedPrecondition(format!(
                            "{at}: its url is remote (no Binary/{id} stored here); Chartline never fetches remote URLs"
                        )));
                    }
                    None => return Err(TimelineError::Missing(format!("{at}: Binary/{id} is not stored"))),
                };
                match content.get("data").and_then(serde_json::Value::as_str) {
                    Some(d) => (d.to_owned(), format!("Binary/{id}")),
                    None => return Err(TimelineError::FailedPrecondition(format!("{at}: Binary/{id} has no data"))),
                }
            }
            images::Location::Remote => {
                return Err(TimelineError::FailedPrecondition(format!(
                    "{at}: its url is not a Binary stored in Chartline; Chartline never fetches remote URLs"
                )));
            }
            images::Location::Absent => return Err(TimelineError::FailedPrecondition(format!("{at} has neither data nor url"))),
        };
        let size = images::decoded_len(&data);
        if size > self.max_attachment_bytes {
            return Err(TimelineError::TooLarge(format!(
                "{at} is {size} bytes, over the {}-byte attachment limit",
                self.max_attachment_bytes
            )));
        }
        images::decode_base64(&data).ok_or_else(|| TimelineError::InvalidArgument(format!("{from}: stored data is not valid base64")))
    }
}
