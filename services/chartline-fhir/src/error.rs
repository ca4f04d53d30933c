//! OperationOutcome-shaped errors. Diagnostics name paths and rules, never the values a
//! client sent: they end up in logs and audit rows, and values can be patient content.

use serde_json::{Value, json};

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The request cannot be processed.
    Fatal,
    /// The content is invalid.
    Error,
    /// Accepted, but worth a look.
    Warning,
    /// For information.
    Information,
}

impl Severity {
    /// The FHIR code.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// `OperationOutcome.issue.code` (FHIR IssueType), the subset Chartline produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IssueCode {
    /// Content invalid against the spec or a profile (generic).
    Invalid,
    /// A structural issue: malformed JSON, unknown element, wrong JSON type.
    Structure,
    /// A required element is missing.
    Required,
    /// An element or header value is invalid.
    Value,
    /// A content validation rule failed (e.g. an invariant such as ele-1).
    Invariant,
    /// Potentially unsafe content (e.g. script in narrative).
    Security,
    /// Processing failure not covered by another code.
    Processing,
    /// The operation or content is not supported.
    NotSupported,
    /// A duplicate, e.g. two entries with the same fullUrl.
    Duplicate,
    /// A conditional match found more than one resource.
    MultipleMatches,
    /// A referenced resource or the requested resource does not exist.
    NotFound,
    /// Content too long (a string, a payload).
    TooLong,
    /// Too costly to process (e.g. nesting too deep).
    TooCostly,
    /// A version conflict.
    Conflict,
    /// The content or stream ended early.
    Incomplete,
    /// An unexpected internal error.
    Exception,
}

impl IssueCode {
    /// The FHIR code.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::Invariant => "invariant",
            IssueCode::Security => "security",
            IssueCode::Processing => "processing",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Duplicate => "duplicate",
            IssueCode::MultipleMatches => "multiple-matches",
            IssueCode::NotFound => "not-found",
            IssueCode::TooLong => "too-long",
            IssueCode::TooCostly => "too-costly",
            IssueCode::Conflict => "conflict",
            IssueCode::Incomplete => "incomplete",
            IssueCode::Exception => "exception",
        }
    }
}

/// One `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// How bad.
    pub severity: Severity,
    /// What kind.
    pub code: IssueCode,
    /// Human-readable, free of patient content.
    pub diagnostics: String,
    /// FHIRPath-ish location, e.g. `Bundle.entry[3].resource.subject`.
    pub expression: Option<String>,
}

impl Issue {
    /// An error issue.
    pub fn error(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Issue { severity: Severity::Error, code, diagnostics: diagnostics.into(), expression: None }
    }

    /// Sets the location.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression = Some(expression.into());
        self
    }

    /// Prefixes the location, for an issue found inside a nested element (a Bundle entry).
    pub fn within(mut self, prefix: &str) -> Self {
        self.expression = Some(match self.expression.take() {
            Some(e) => {
                // `Patient.name` inside `Bundle.entry[2].resource` becomes `Bundle.entry[2].resource.name`.
                let rest = e.split_once('.').map(|(_, r)| format!(".{r}")).unwrap_or_default();
                format!("{prefix}{rest}")
            }
            None => prefix.to_owned(),
        });
        self
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "severity": self.severity.as_str(),
            "code": self.code.as_str(),
            "diagnostics": self.diagnostics,
        });
        if let Some(e) = &self.expression {
            v["expression"] = json!([e]);
        }
        v
    }
}

/// A rejected request: one or more issues, the first being the main one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .issues.first().map(|i| i.diagnostics.as_str()).unwrap_or("invalid FHIR content"))]
pub struct FhirError {
    /// At least one issue.
    pub issues: Vec<Issue>,
}

impl FhirError {
    /// An error with one issue.
    pub fn new(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        FhirError { issues: vec![Issue::error(code, diagnostics)] }
    }

    /// An error with one located issue.
    pub fn at(code: IssueCode, expression: impl Into<String>, diagnostics: impl Into<String>) -> Self {
        FhirError { issues: vec![Issue::error(code, diagnostics).at(expression)] }
    }

    /// The main issue's code.
    pub fn code(&self) -> IssueCode {
        self.issues.first().map(|i| i.code).unwrap_or(IssueCode::Invalid)
    }

    /// Prefixes every issue's location (see [`Issue::within`]).
    pub fn within(mut self, prefix: &str) -> Self {
        self.issues = self.issues.into_iter().map(|i| i.within(prefix)).collect();
        self
    }

    /// The FHIR `OperationOutcome` resource.
    pub fn to_operation_outcome(&self) -> Value {
        json!({
            "resourceType": "OperationOutcome",
            "issue": self.issues.iter().map(Issue::to_json).collect::<Vec<_>>(),
        })
    }

    /// The HTTP status a REST face answers with.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            // A located not-found is content that points nowhere (a broken reference): 400.
            // An unlocated one is the addressed resource itself: 404.
            IssueCode::NotFound if self.issues.first().is_some_and(|i| i.expression.is_some()) => 400,
            IssueCode::NotFound => 404,
            IssueCode::TooLong => 413,
            IssueCode::MultipleMatches => 412,
            IssueCode::Conflict => 409,
            IssueCode::NotSupported => 422,
            IssueCode::Exception => 500,
            _ => 400,
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_issue_locations_are_rebased_onto_the_entry() {
        let i = Issue::error(IssueCode::Value, "bad").at("Patient.birthDate").within("Bundle.entry[2].resource");
        assert_eq!(i.expression.as_deref(), Some("Bundle.entry[2].resource.birthDate"));
    }

    #[test]
    fn operation_outcome_carries_code_and_expression() {
        let e = FhirError::at(IssueCode::Structure, "Patient.foo", "unknown element");
        let oo = e.to_operation_outcome();
        assert_eq!(oo["issue"][0]["code"], "structure");
        assert_eq!(oo["issue"][0]["expression"][0], "Patient.foo");
        assert_eq!(e.http_status(), 400);
    }
}
