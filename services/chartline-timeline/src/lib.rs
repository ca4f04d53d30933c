//! The longitudinal patient timeline and the prompts built from it.
//!
//! [`Timeline::events`] is one indexed SELECT over `patient_event`; [`Timeline::build_prompt`]
//! turns those rows (plus the Patient resource and the newest notes) into IPS-shaped
//! sections where every line carries its source tag, cut to a token budget counted by the
//! model's own tokenizer ([`TokenCounter`]), dropping lines by a documented priority
//! (see `prompt.rs`). The same data, task, budget and `as_of` give byte-identical text.

pub mod grpc;
mod prompt;
mod sections;

use std::sync::Arc;

use chartline_store::{EventFilter, EventRow, Store, StoreError};
use chrono::{DateTime, Utc};
use serde_json::Value;

pub use prompt::{Citation, Prompt, Section, TEMPLATE_VERSION};
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
    /// A request field is out of range; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// The database failed.
    #[error("storage failure")]
    Store(#[from] StoreError),
}

impl From<TimelineError> for tonic::Status {
    fn from(e: TimelineError) -> Self {
        match e {
            TimelineError::NotFound => tonic::Status::not_found("patient not found"),
            TimelineError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            TimelineError::Store(s) => {
                tracing::error!(error = %s, "storage failure in timeline");
                tonic::Status::internal("storage failure")
            }
        }
    }
}

/// Smallest and largest accepted token budgets.
pub const BUDGET_RANGE: (i64, i64) = (64, 1_000_000);
/// Notes whose text is read (newest first) when building a prompt.
const NOTES_READ: usize = 5;

/// The timeline service's logic.
#[derive(Clone)]
pub struct Timeline {
    store: Store,
    counter: Arc<dyn TokenCounter>,
}

impl Timeline {
    /// A timeline over `store`, counting tokens with `counter`.
    pub fn new(store: Store, counter: Arc<dyn TokenCounter>) -> Self {
        Timeline { store, counter }
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

    /// Builds the prompt for `task` within `token_budget` tokens, reading the chart as of `as_of`.
    pub async fn build_prompt(
        &self,
        patient_id: &str,
        task: &str,
        token_budget: i64,
        as_of: DateTime<Utc>,
    ) -> Result<Prompt, TimelineError> {
        let task = Task::parse(task)?;
        if !(BUDGET_RANGE.0..=BUDGET_RANGE.1).contains(&token_budget) {
            return Err(TimelineError::InvalidArgument(format!(
                "token_budget must be between {} and {}",
                BUDGET_RANGE.0, BUDGET_RANGE.1
            )));
        }
        // Three independent reads, concurrently: the Patient, the events, the newest notes.
        let filter = EventFilter { to: Some(as_of), ..EventFilter::default() };
        let (patient, events, docs) = tokio::try_join!(
            self.patient(patient_id),
            async { self.store.patient_events(patient_id, &filter).await.map_err(TimelineError::from) },
            async { self.store.newest_documents(patient_id, as_of, NOTES_READ as i64).await.map_err(TimelineError::from) },
        )?;
        let (patient, patient_version) = patient;
        let notes = docs
            .into_iter()
            .filter_map(|(event, content)| sections::note_text(&content).map(|text| sections::Note { event, text }))
            .collect();
        let input = sections::Input { patient: &patient, patient_version, events: &events, notes, as_of };
        prompt::build(&input, task, token_budget as usize, self.counter.as_ref())
    }
}
