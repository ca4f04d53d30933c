//! HTTP faces: CDS Hooks 2.0 (`/cds-services`), the audit API over REST (`/audit`), and the
//! FHIR search for an output's Provenance (`GET /fhir/Provenance?target=`).

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chartline_store::{OutputFilter, OutputRow, Store};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::audit::Audit;
use crate::grpc::{chain_response, provenance_record, summary};
use crate::summary::TASK;

/// The one CDS service.
pub const SERVICE_ID: &str = "chart-summary";

#[derive(Clone)]
struct HookState {
    store: Store,
    audit: Audit,
    /// Base URL for links in cards (`http://host:port`).
    base_url: String,
}

/// The `/cds-services`, `/audit` and `/fhir/Provenance` routes.
pub fn router(store: Store, audit: Audit, base_url: String) -> Router {
    Router::new()
        .route("/cds-services", get(discovery))
        .route("/cds-services/chart-summary", post(chart_summary))
        .route("/cds-services/chart-summary/feedback", post(feedback))
        .route("/audit/outputs", get(list_outputs))
        .route("/audit/outputs/{id}", get(get_output))
        .route("/audit/outputs/{id}/replay", post(replay))
        .route("/audit/verify", get(verify))
        .route("/fhir/Provenance", get(provenance_search))
        .with_state(HookState { store, audit, base_url })
}

fn bad_request(reason: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": reason}))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "failure in an HTTP face");
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": "internal error"}))).into_response()
}

async fn discovery() -> Json<Value> {
    Json(json!({"services": [{
        "hook": "patient-view",
        "id": SERVICE_ID,
        "title": "AI chart summary",
        "description": "A summary of the patient's chart, generated ahead of time by an on-premises model, with every statement linked to its source resource and full provenance.",
        "prefetch": {"patient": "Patient/{{context.patientId}}"},
        "usageRequirements": "Summaries are prepared when data arrives; a chart opened before its first summary gets no card, and a summary is queued."
    }]}))
}

/// Validates a `patient-view` request (CDS Hooks 2.0): the reason on failure.
fn validate_hook(body: &Value) -> Result<String, String> {
    let obj = body.as_object().ok_or("the request body must be a JSON object")?;
    match obj.get("hook").and_then(Value::as_str) {
        Some("patient-view") => {}
        Some(_) => return Err("hook must be patient-view for this service".into()),
        None => return Err("hook is required".into()),
    }
    let instance = obj.get("hookInstance").and_then(Value::as_str).ok_or("hookInstance is required")?;
    Uuid::parse_str(instance).map_err(|_| "hookInstance must be a UUID")?;
    if let Some(s) = obj.get("fhirServer") {
        let s = s.as_str().ok_or("fhirServer must be a string")?;
        if !(s.starts_with("https://") || s.starts_with("http://")) {
            return Err("fhirServer must be an absolute URL".into());
        }
        if let Some(auth) = obj.get("fhirAuthorization") {
            for k in ["access_token", "token_type", "expires_in", "scope", "subject"] {
                if auth.get(k).is_none() {
                    return Err(format!("fhirAuthorization.{k} is required"));
                }
            }
            if auth["token_type"] != "Bearer" {
                return Err("fhirAuthorization.token_type must be Bearer".into());
            }
        }
    } else if obj.contains_key("fhirAuthorization") {
        return Err("fhirAuthorization requires fhirServer".into());
    }
    let ctx = obj.get("context").and_then(Value::as_object).ok_or("context is required and must be an object")?;
    ctx.get("userId").and_then(Value::as_str).ok_or("context.userId is required")?;
    let patient = ctx.get("patientId").and_then(Value::as_str).ok_or("context.patientId is required")?;
    if !chartline_fhir::is_valid_id(patient) {
        return Err("context.patientId must be a FHIR id".into());
    }
    Ok(patient.to_owned())
}

fn count_lines(o: &OutputRow, key: &str) -> usize {
    o.sections
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["key"] == key)
        .and_then(|s| s["text"].as_str())
        .map_or(0, |t| t.lines().filter(|l| l.starts_with("- ")).count())
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The card for the newest output.
fn card(o: &OutputRow, model: &str, pending: bool, base_url: &str) -> Value {
    let mut summary = format!(
        "AI chart summary: {}, {}, {}",
        plural(count_lines(o, "problems"), "active problem", "active problems"),
        plural(count_lines(o, "medications"), "medication", "medications"),
        plural(count_lines(o, "allergies"), "allergy", "allergies"),
    );
    if summary.chars().count() > 140 {
        summary = summary.chars().take(139).collect::<String>() + "…";
    }
    let mut detail = format!(
        "**AI-generated by {model}, preliminary: verify against the cited sources.** {} of {} statements carry a verified source.\n\n{}\n",
        o.statements.as_array().map_or(0, |s| s.iter().filter(|x| x["supported"] == true).count()),
        o.statements.as_array().map_or(0, Vec::len),
        o.narrative.trim()
    );
    if pending {
        detail.push_str("\n> Newer data has arrived since this summary was made; an updated summary is queued.\n");
    }
    for s in o.sections.as_array().into_iter().flatten() {
        if let Some(text) = s["text"].as_str().filter(|t| !t.is_empty()) {
            let body: String = text.lines().skip(1).collect::<Vec<_>>().join("\n");
            detail.push_str(&format!("\n### {}\n{}\n", s["title"].as_str().unwrap_or(""), body));
        }
    }
    detail.push_str(&format!("\n_Generated {} · output {}_\n", o.created_at.format("%Y-%m-%d %H:%M UTC"), o.id));
    json!({
        "uuid": o.id.to_string(),
        "summary": summary,
        "detail": detail,
        "indicator": "info",
        "source": {"label": "Chartline", "topic": {"system": "urn:chartline:cds", "code": SERVICE_ID, "display": "AI chart summary"}},
        "links": [
            {"label": "Full summary (FHIR Composition)", "url": format!("{base_url}/fhir/Composition/{}", o.id), "type": "absolute"},
            {"label": "Provenance", "url": format!("{base_url}/fhir/Provenance?target=Composition/{}", o.id), "type": "absolute"}
        ],
    })
}

async fn chart_summary(State(st): State<HookState>, body: Result<Json<Value>, axum::extract::rejection::JsonRejection>) -> Response {
    let Ok(Json(body)) = body else { return bad_request("the request body must be JSON") };
    let patient = match validate_hook(&body) {
        Ok(p) => p,
        Err(reason) => return bad_request(&reason),
    };
    let latest = match st.store.latest_output(&patient, TASK).await {
        Ok(l) => l,
        Err(e) => return internal(e),
    };
    let Some(o) = latest else {
        // Nothing yet: answer at once with no card, and have one made. Unknown patients get
        // no job (there is no chart to summarize).
        match st.store.read("Patient", &patient).await {
            Ok(Some(_)) => {
                if let Err(e) = st.store.enqueue_summary_now(&patient).await {
                    return internal(e);
                }
            }
            Ok(None) => {}
            Err(e) => return internal(e),
        }
        return Json(json!({"cards": []})).into_response();
    };
    let (pending, prov) = match (st.store.summary_pending(&patient).await, st.store.provenance_of(o.id).await) {
        (Ok(p), Ok(prov)) => (p, prov),
        (Err(e), _) | (_, Err(e)) => return internal(e),
    };
    let model = prov.map(|p| p.content.model_name).unwrap_or_else(|| "an AI model".into());
    Json(json!({"cards": [card(&o, &model, pending, &st.base_url)]})).into_response()
}

async fn feedback(State(st): State<HookState>, body: Result<Json<Value>, axum::extract::rejection::JsonRejection>) -> Response {
    let Ok(Json(body)) = body else { return bad_request("the request body must be JSON") };
    let Some(items) = body.get("feedback").and_then(Value::as_array) else {
        return bad_request("feedback must be an array");
    };
    for f in items {
        let Some(card) = f.get("card").and_then(Value::as_str) else { return bad_request("feedback[].card is required") };
        let Some(outcome) = f.get("outcome").and_then(Value::as_str) else { return bad_request("feedback[].outcome is required") };
        if !matches!(outcome, "accepted" | "overridden") {
            return bad_request("feedback[].outcome must be accepted or overridden");
        }
        let ts = match f.get("outcomeTimestamp").and_then(Value::as_str) {
            Some(t) => match chrono::DateTime::parse_from_rfc3339(t) {
                Ok(t) => Some(t.with_timezone(&chrono::Utc)),
                Err(_) => return bad_request("feedback[].outcomeTimestamp must be an ISO 8601 instant"),
            },
            None => return bad_request("feedback[].outcomeTimestamp is required"),
        };
        if let Err(e) = st.store.store_feedback(SERVICE_ID, card, outcome, ts, f).await {
            return internal(e);
        }
    }
    StatusCode::OK.into_response()
}

async fn list_outputs(State(st): State<HookState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let parse_time = |k: &str| q.get(k).map(|s| chrono::DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&chrono::Utc)));
    let (from, to) = match (parse_time("from").transpose(), parse_time("to").transpose()) {
        (Ok(f), Ok(t)) => (f, t),
        _ => return bad_request("from and to must be RFC 3339 times"),
    };
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 100,
        Some(Ok(l)) if (1..=1000).contains(&l) => l,
        Some(_) => return bad_request("limit must be 1 to 1000"),
    };
    let filter = OutputFilter { patient_id: q.get("patient").cloned(), model_name: q.get("model").cloned(), from, to, limit };
    match st.store.list_outputs(&filter).await {
        Ok(rows) => Json(json!({"outputs": rows.iter().map(|(o, p)| summary_json(o, p)).collect::<Vec<_>>()})).into_response(),
        Err(e) => internal(e),
    }
}

fn summary_json(o: &OutputRow, p: &chartline_store::ProvenanceRow) -> Value {
    let s = summary(o, p);
    let prov = provenance_record(p);
    json!({
        "output_id": s.output_id,
        "patient_id": s.patient_id,
        "created_at": o.created_at.to_rfc3339(),
        "narrative": s.narrative,
        "citations_found": s.citations_found,
        "citations_verified": s.citations_verified,
        "unsupported_statements": s.unsupported_statements,
        "finish_reason": s.finish_reason,
        "provenance": {
            "chain_seq": prov.chain_seq,
            "model": prov.model.as_ref().map(|m| json!({"name": m.name, "backend": m.backend, "weights_sha256": m.weights_sha256, "tokenizer_sha256": m.tokenizer_sha256})),
            "template_version": prov.template_version,
            "prompt_sha256": prov.prompt_sha256,
            "inputs": prov.inputs.iter().map(|r| format!("{}/{}/_history/{}", r.resource_type, r.id, r.version_id)).collect::<Vec<_>>(),
            "parameters": serde_json::from_str::<Value>(&prov.parameters_json).unwrap_or(Value::Null),
            "requester": prov.requester,
            "latency_ms": prov.latency_ms,
            "output_sha256": prov.output_sha256,
            "row_hash": prov.row_hash,
            "prev_hash": prov.prev_hash,
        }
    })
}

async fn get_output(State(st): State<HookState>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else { return bad_request("output id must be a UUID") };
    match (st.store.output(id).await, st.store.provenance_of(id).await) {
        (Ok(Some(o)), Ok(Some(p))) => {
            let mut v = summary_json(&o, &p);
            v["provenance"]["prompt_text"] = json!(p.content.prompt_text);
            Json(v).into_response()
        }
        (Ok(_), Ok(_)) => (StatusCode::NOT_FOUND, Json(json!({"error": "no such output"}))).into_response(),
        (Err(e), _) | (_, Err(e)) => internal(e),
    }
}

async fn verify(State(st): State<HookState>) -> Response {
    match st.audit.verify_chain().await {
        Ok(r) => {
            let v = chain_response(&r);
            Json(json!({"ok": v.ok, "rows_checked": v.rows_checked, "first_broken_seq": v.first_broken_seq,
                        "first_broken_output_id": v.first_broken_output_id, "reason": v.reason}))
            .into_response()
        }
        Err(e) => internal(e),
    }
}

async fn replay(State(st): State<HookState>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else { return bad_request("output id must be a UUID") };
    match st.audit.replay(id).await {
        Ok(r) => Json(json!({"matches": r.matches, "recorded_output_sha256": r.recorded_output_sha256,
                             "replayed_output_sha256": r.replayed_output_sha256, "same_weights": r.same_weights}))
        .into_response(),
        Err(s) if s.code() == tonic::Code::NotFound => (StatusCode::NOT_FOUND, Json(json!({"error": "no such output"}))).into_response(),
        Err(s) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": s.message()}))).into_response(),
    }
}

/// `GET /fhir/Provenance?target=Composition/{id}`: a searchset of the matching Provenance.
async fn provenance_search(State(st): State<HookState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let fhir = |status: StatusCode, v: Value| {
        let mut r = (status, Json(v)).into_response();
        r.headers_mut().insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/fhir+json"));
        r
    };
    let Some(target) = q.get("target") else {
        return fhir(StatusCode::BAD_REQUEST, json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "Provenance search needs target=Type/id"}]}));
    };
    match st.store.provenance_resources_for(target).await {
        Ok(found) => fhir(
            StatusCode::OK,
            json!({"resourceType": "Bundle", "type": "searchset", "total": found.len(),
                   "entry": found.into_iter().map(|r| json!({"fullUrl": format!("Provenance/{}", r["id"].as_str().unwrap_or("")), "resource": r, "search": {"mode": "match"}})).collect::<Vec<_>>()}),
        ),
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> Value {
        json!({"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
               "context": {"userId": "Practitioner/1", "patientId": "p1"}})
    }

    #[test]
    fn a_well_formed_patient_view_request_passes() {
        assert_eq!(validate_hook(&hook()).as_deref(), Ok("p1"));
    }

    #[test]
    fn malformed_hook_requests_are_refused_with_a_reason() {
        let mut cases = Vec::new();
        let mut v = hook();
        v["hook"] = json!("order-select");
        cases.push((v, "hook"));
        let mut v = hook();
        v.as_object_mut().map(|o| o.remove("hookInstance"));
        cases.push((v, "hookInstance"));
        let mut v = hook();
        v["context"].as_object_mut().map(|o| o.remove("patientId"));
        cases.push((v, "patientId"));
        let mut v = hook();
        v["fhirServer"] = json!("https://ehr.example/fhir");
        v["fhirAuthorization"] = json!({"access_token": "x", "token_type": "MAC"});
        cases.push((v, "fhirAuthorization"));
        cases.push((json!([1, 2]), "object"));
        for (v, word) in cases {
            let err = validate_hook(&v).expect_err("must be refused");
            assert!(err.contains(word), "{err} should name {word}");
        }
    }
}
