//! The ingest error and its one mapping to each wire: FHIR OperationOutcome + HTTP status,
//! and gRPC `Status` with the OperationOutcome JSON in the details.

use chartline_fhir::{FhirError, IssueCode};
use chartline_store::StoreError;
use serde_json::Value;

/// Why an ingest or read failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The client sent something invalid (or something that does not resolve).
    #[error(transparent)]
    Invalid(#[from] FhirError),
    /// The database failed; the cause is logged, not returned.
    #[error("storage failure")]
    Store(#[from] StoreError),
}

impl IngestError {
    /// Shorthand for a one-issue client error.
    pub fn invalid(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        IngestError::Invalid(FhirError::new(code, diagnostics))
    }

    /// The OperationOutcome a client sees. Storage causes stay in the log.
    pub fn to_operation_outcome(&self) -> Value {
        match self {
            IngestError::Invalid(e) => e.to_operation_outcome(),
            IngestError::Store(_) => {
                FhirError::new(IssueCode::Exception, "the request could not be stored; nothing was written")
                    .to_operation_outcome()
            }
        }
    }

    /// The HTTP status for the REST face.
    pub fn http_status(&self) -> u16 {
        match self {
            IngestError::Invalid(e) => e.http_status(),
            IngestError::Store(_) => 500,
        }
    }

    /// Logs the internal cause (never content) and returns self.
    pub fn logged(self) -> Self {
        if let IngestError::Store(e) = &self {
            tracing::error!(error = %e, "storage failure during ingest");
        }
        self
    }
}

impl From<IngestError> for tonic::Status {
    fn from(e: IngestError) -> Self {
        let e = e.logged();
        let details = serde_json::to_vec(&e.to_operation_outcome()).unwrap_or_default();
        let code = match &e {
            IngestError::Invalid(f) => match f.code() {
                IssueCode::NotFound if f.issues.first().is_some_and(|i| i.expression.is_none()) => tonic::Code::NotFound,
                IssueCode::Exception => tonic::Code::Internal,
                _ => tonic::Code::InvalidArgument,
            },
            IngestError::Store(_) => tonic::Code::Internal,
        };
        let message = match &e {
            IngestError::Invalid(f) => f.to_string(),
            IngestError::Store(_) => "storage failure; nothing was written".to_owned(),
        };
        tonic::Status::with_details(code, message, details.into())
    }
}
