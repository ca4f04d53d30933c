//! The FHIR REST face (`application/fhir+json`): Bundles, create, update, read, vread,
//! history, `Patient/$everything`, NDJSON `$import` and the CapabilityStatement.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chartline_fhir::{FhirError, IssueCode, Reference, for_each_reference, is_resource_type, is_valid_id, parse_reference};
use chartline_store::StoredResource;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::bundle::status_line;
use crate::{IngestError, Ingestor, Interaction, Source};

const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// The `/fhir` routes over an [`Ingestor`]. Body limits are enforced by the handlers
/// (413 with an OperationOutcome), so the router sets no limit of its own.
pub fn router(ingestor: Ingestor) -> Router {
    Router::new()
        .route("/fhir", post(post_bundle))
        .route("/fhir/", post(post_bundle))
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/$import", post(import_ndjson))
        .route("/fhir/{rtype}", post(create))
        .route("/fhir/{rtype}/{id}", get(read).put(update))
        .route("/fhir/{rtype}/{id}/{op}", get(instance_op))
        .route("/fhir/{rtype}/{id}/_history/{vid}", get(vread))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(ingestor)
}

fn fhir(status: StatusCode, body: &Value) -> Response {
    fhir_bytes(status, serde_json::to_vec(body).unwrap_or_default())
}

/// A response whose body is JSON text already.
fn fhir_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

fn error(e: IngestError) -> Response {
    let e = e.logged();
    fhir(StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST), &e.to_operation_outcome())
}

fn client_error(code: IssueCode, status: StatusCode, msg: &str) -> Response {
    fhir(status, &FhirError::new(code, msg).to_operation_outcome())
}

fn source(headers: &HeaderMap) -> Source {
    let sender = headers
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().chars().take(200).collect::<String>())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rest".to_owned());
    Source { sender, channel: "rest" }
}

/// Refuses bodies that are declared as something other than JSON.
fn check_json_content_type(headers: &HeaderMap) -> Result<(), Response> {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return Ok(()) };
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if matches!(mime.as_str(), "application/fhir+json" | "application/json" | "application/json+fhir" | "") {
        Ok(())
    } else {
        Err(client_error(IssueCode::NotSupported, StatusCode::UNSUPPORTED_MEDIA_TYPE, "send application/fhir+json"))
    }
}

/// Reads a body up to the payload limit; past it, 413 with an OperationOutcome.
async fn read_body(ingestor: &Ingestor, body: Body) -> Result<bytes::Bytes, Response> {
    let limit = ingestor.limits().max_bytes;
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        client_error(
            IssueCode::TooLong,
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is over the limit of {limit} bytes"),
        )
    })
}

async fn post_bundle(State(ing): State<Ingestor>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = check_json_content_type(&headers) {
        return r;
    }
    let bytes = match read_body(&ing, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match ing.ingest_bundle(&bytes, &source(&headers)).await {
        Ok(resp) => fhir_bytes(StatusCode::OK, resp.bundle),
        Err(e) => error(e),
    }
}

fn check_type(rtype: &str) -> Result<(), Response> {
    if is_resource_type(rtype) {
        Ok(())
    } else {
        Err(client_error(IssueCode::NotSupported, StatusCode::NOT_FOUND, "unknown resource type"))
    }
}

fn check_id(id: &str) -> Result<(), Response> {
    if is_valid_id(id) { Ok(()) } else { Err(client_error(IssueCode::Invalid, StatusCode::BAD_REQUEST, "invalid resource id")) }
}

async fn create(State(ing): State<Ingestor>, Path(rtype): Path<String>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = check_type(&rtype).and_then(|_| check_json_content_type(&headers)) {
        return r;
    }
    let bytes = match read_body(&ing, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let if_none_exist = headers
        .get("if-none-exist")
        .and_then(|v| v.to_str().ok())
        .map(|q| q.trim_start_matches(|c| c == '?' || c == '/').rsplit('?').next().unwrap_or("").to_owned());
    let interaction = Interaction::Create { resource_type: Some(rtype), if_none_exist };
    write_response(&ing, ing.ingest_resource(&bytes, interaction, &source(&headers)).await).await
}

async fn update(State(ing): State<Ingestor>, Path((rtype, id)): Path<(String, String)>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = check_type(&rtype).and_then(|_| check_id(&id)).and_then(|_| check_json_content_type(&headers)) {
        return r;
    }
    let bytes = match read_body(&ing, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let interaction = Interaction::Update { resource_type: rtype, id };
    write_response(&ing, ing.ingest_resource(&bytes, interaction, &source(&headers)).await).await
}

async fn write_response(ing: &Ingestor, result: Result<crate::ResourceOutcome, IngestError>) -> Response {
    let r = match result {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    let status = match r.outcome {
        Some(chartline_store::WriteOutcome::Created) => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    match ing.store().read(&r.resource_type, &r.id).await {
        Ok(Some(stored)) => {
            let mut resp = versioned(status, &stored);
            let loc = format!("/fhir/{}/{}/_history/{}", stored.resource_type, stored.id, stored.version_id);
            if let Ok(v) = HeaderValue::from_str(&loc) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Ok(None) => client_error(IssueCode::Exception, StatusCode::INTERNAL_SERVER_ERROR, "stored resource not found"),
        Err(e) => error(e.into()),
    }
}

/// A stored version with ETag and Last-Modified; 410 for a deleted one.
fn versioned(status: StatusCode, stored: &StoredResource) -> Response {
    let mut resp = match &stored.content {
        Some(c) => fhir(status, c),
        None => client_error(IssueCode::NotFound, StatusCode::GONE, "the resource was deleted"),
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", stored.version_id)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&stored.last_updated.format("%a, %d %b %Y %H:%M:%S GMT").to_string()) {
        h.insert(header::LAST_MODIFIED, v);
    }
    resp
}

fn not_found() -> Response {
    client_error(IssueCode::NotFound, StatusCode::NOT_FOUND, "no such resource")
}

async fn read(State(ing): State<Ingestor>, Path((rtype, id)): Path<(String, String)>) -> Response {
    if let Err(r) = check_type(&rtype).and_then(|_| check_id(&id)) {
        return r;
    }
    match ing.store().read(&rtype, &id).await {
        Ok(Some(s)) => versioned(StatusCode::OK, &s),
        Ok(None) => not_found(),
        Err(e) => error(e.into()),
    }
}

async fn vread(State(ing): State<Ingestor>, Path((rtype, id, vid)): Path<(String, String, String)>) -> Response {
    if let Err(r) = check_type(&rtype).and_then(|_| check_id(&id)) {
        return r;
    }
    let Ok(v) = vid.parse::<i64>() else {
        return client_error(IssueCode::Invalid, StatusCode::BAD_REQUEST, "version ids are positive integers");
    };
    match ing.store().read_version(&rtype, &id, v).await {
        Ok(Some(s)) => versioned(StatusCode::OK, &s),
        Ok(None) => not_found(),
        Err(e) => error(e.into()),
    }
}

async fn instance_op(State(ing): State<Ingestor>, Path((rtype, id, op)): Path<(String, String, String)>) -> Response {
    if let Err(r) = check_type(&rtype).and_then(|_| check_id(&id)) {
        return r;
    }
    match (rtype.as_str(), op.as_str()) {
        (_, "_history") => history(&ing, &rtype, &id).await,
        ("Patient", "$everything") => everything(&ing, &id).await,
        _ => client_error(IssueCode::NotSupported, StatusCode::NOT_FOUND, "unknown operation"),
    }
}

async fn history(ing: &Ingestor, rtype: &str, id: &str) -> Response {
    let versions = match ing.store().history(rtype, id).await {
        Ok(v) => v,
        Err(e) => return error(e.into()),
    };
    if versions.is_empty() {
        return not_found();
    }
    let entries: Vec<Value> = versions
        .iter()
        .map(|s| {
            let mut e = json!({
                "fullUrl": format!("{}/{}", s.resource_type, s.id),
                "request": {"method": if s.version_id == 1 { "POST" } else if s.content.is_none() { "DELETE" } else { "PUT" },
                            "url": if s.version_id == 1 { s.resource_type.clone() } else { format!("{}/{}", s.resource_type, s.id) }},
                "response": {"status": status_line(if s.version_id == 1 { 201 } else { 200 }),
                             "etag": format!("W/\"{}\"", s.version_id),
                             "lastModified": s.last_updated.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)},
            });
            if let Some(c) = &s.content {
                e["resource"] = c.clone();
            }
            e
        })
        .collect();
    fhir(StatusCode::OK, &json!({"resourceType": "Bundle", "type": "history", "total": entries.len(), "entry": entries}))
}

/// The Patient, every resource in its compartment, and the resources those reference
/// that live outside any compartment (practitioners, organizations, locations, medications).
async fn everything(ing: &Ingestor, id: &str) -> Response {
    let store = ing.store();
    let compartment = match store.compartment(id).await {
        Ok(c) => c,
        Err(e) => return error(e.into()),
    };
    if !compartment.iter().any(|s| s.resource_type == "Patient") {
        return not_found();
    }
    let mut have: BTreeSet<(String, String)> =
        compartment.iter().map(|s| (s.resource_type.clone(), s.id.clone())).collect();
    let mut wanted = BTreeSet::new();
    for s in &compartment {
        if let Some(c) = &s.content {
            // Stored content comes back as serde_json's tree; the walk reads ours (a copy,
            // off the ingest path).
            for_each_reference(&chartline_fhir::Json::from(c), &mut |r| {
                if let Reference::Literal { resource_type, id, absolute: false, .. } = parse_reference(r) {
                    let key = (resource_type.to_owned(), id.to_owned());
                    if !have.contains(&key) {
                        wanted.insert(key);
                    }
                }
            });
        }
    }
    let wanted: Vec<(String, String)> = wanted.into_iter().collect();
    let referenced = match store.read_many(&wanted).await {
        Ok(r) => r,
        Err(e) => return error(e.into()),
    };
    let mut entries = Vec::with_capacity(compartment.len() + referenced.len());
    for s in compartment.iter().chain(referenced.iter()) {
        if let Some(c) = &s.content {
            have.insert((s.resource_type.clone(), s.id.clone()));
            entries.push(json!({"fullUrl": format!("{}/{}", s.resource_type, s.id), "resource": c, "search": {"mode": "match"}}));
        }
    }
    fhir(StatusCode::OK, &json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries}))
}

async fn import_ndjson(State(ing): State<Ingestor>, headers: HeaderMap, body: Body) -> Response {
    if let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !matches!(mime.as_str(), "application/fhir+ndjson" | "application/ndjson" | "application/x-ndjson" | "text/plain" | "") {
            return client_error(IssueCode::NotSupported, StatusCode::UNSUPPORTED_MEDIA_TYPE, "send application/fhir+ndjson");
        }
    }
    let stream = body.into_data_stream().map(|r| r.map_err(|e| e.to_string()));
    let report = match ing.ingest_ndjson(Box::pin(stream), &source(&headers)).await {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    let c = report.counts;
    let mut issues = vec![json!({
        "severity": "information",
        "code": "informational",
        "diagnostics": format!("created {}, updated {}, unchanged {}, rejected {}", c.created, c.updated, c.unchanged, c.rejected),
    })];
    for e in &report.errors {
        for mut i in e.outcome["issue"].as_array().cloned().unwrap_or_default() {
            let at = i["expression"][0].as_str().map(|x| format!(" at {x}")).unwrap_or_default();
            i["expression"] = json!([format!("line {}{}", e.line, at)]);
            issues.push(i);
        }
    }
    let status = if c.rejected > 0 && c.created + c.updated + c.unchanged == 0 { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    fhir(status, &json!({"resourceType": "OperationOutcome", "issue": issues}))
}

/// The CapabilityStatement: exactly the interactions this face serves.
async fn metadata() -> Response {
    let resources: Vec<Value> = chartline_fhir::R4_RESOURCE_TYPES
        .iter()
        .map(|t| {
            let mut r = json!({
                "type": t,
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalUpdate": true,
                "referencePolicy": ["literal", "local"],
                "interaction": [
                    {"code": "read"}, {"code": "vread"}, {"code": "history-instance"},
                    {"code": "create"}, {"code": "update"}
                ],
            });
            if *t == "Patient" {
                r["operation"] = json!([{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}]);
            }
            r
        })
        .collect();
    fhir(
        StatusCode::OK,
        &json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-11-29",
            "kind": "instance",
            "software": {"name": "Chartline", "version": env!("CARGO_PKG_VERSION")},
            "implementation": {"description": "Chartline FHIR ingest"},
            "fhirVersion": chartline_fhir::FHIR_VERSION,
            "format": ["application/fhir+json"],
            "rest": [{
                "mode": "server",
                "documentation": "Search is not offered. Conditional create/update and conditional references accept identifier=[system|]value and _id only. $import takes an NDJSON body (one resource a line).",
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "operation": [{"name": "import", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/import"}],
            }],
        }),
    )
}
