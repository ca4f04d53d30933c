//! Summaries end to end: Bundle → timeline → the real model → citation check → provenance
//! chain → CDS Hooks card, FHIR Composition/Provenance, audit (verify, replay).

use chartline_cds::summary::SummaryConfig;
use chartline_proto::v1::audit_service_client::AuditServiceClient;
use chartline_proto::v1::summary_service_client::SummaryServiceClient;
use chartline_proto::v1::{ListOutputsRequest, ReplayRequest, SummarizeRequest, Summary, VerifyChainRequest};
use serde_json::{Value, json};
use sqlx::PgPool;
use tests::{TestServer, start_server_with_model, synthea_bundles};
use tonic::transport::Channel;

const CKD_PATIENT: &str = "4b86befa-fa7e-9285-615f-e081dab3f93c";

/// Small enough to keep each generation to a few seconds on two cores.
fn quick() -> SummaryConfig {
    SummaryConfig { token_budget: 700, max_tokens: 24, ..SummaryConfig::default() }
}

async fn load(server: &TestServer, patients: &[&str]) {
    let files = synthea_bundles();
    let mut chosen = vec![files[0].clone(), files[1].clone()];
    for p in patients {
        chosen.push(files.iter().find(|f| f.to_string_lossy().contains(p)).expect("fixture patient").clone());
    }
    server.load_synthea(&chosen).await;
}

async fn summarize(server: &TestServer, patient: &str) -> Summary {
    let mut c = SummaryServiceClient::connect(server.grpc.clone()).await.expect("connect");
    c.summarize(SummarizeRequest { patient_id: patient.into(), requester: "test-clinician".into() }).await.expect("summarize").into_inner()
}

async fn hook(server: &TestServer, patient: &str) -> (u16, Value) {
    let body = json!({"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                      "context": {"userId": "Practitioner/example", "patientId": patient}});
    let r = server.http.post(format!("{}/cds-services/chart-summary", server.http_root())).json(&body).send().await.expect("sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn audit(server: &TestServer) -> AuditServiceClient<Channel> {
    AuditServiceClient::connect(server.grpc.clone()).await.expect("connect")
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn from_bundle_to_cds_card_with_fhir_composition_and_provenance(pool: PgPool) {
    let server = start_server_with_model(pool.clone(), quick()).await;
    load(&server, &[CKD_PATIENT]).await;

    let discovery: Value = server.http.get(format!("{}/cds-services", server.http_root())).send().await.expect("sent").json().await.expect("json");
    assert_eq!(discovery["services"][0]["hook"], "patient-view");
    assert_eq!(discovery["services"][0]["id"], "chart-summary");

    // Before any summary: no card, not an error, and a job is due now.
    let (status, body) = hook(&server, CKD_PATIENT).await;
    assert_eq!((status, body["cards"].as_array().map(Vec::len)), (200, Some(0)));
    let due: bool = sqlx::query_scalar("select not_before <= now() from summary_job where patient_id = $1").bind(CKD_PATIENT).fetch_one(&pool).await.expect("job");
    assert!(due, "the hook asked for a summary");

    let s = summarize(&server, CKD_PATIENT).await;
    assert!(!s.narrative.is_empty(), "the model wrote something");
    for key in ["allergies", "problems", "medications", "results"] {
        if key != "allergies" {
            assert!(s.sections.iter().any(|x| x.key == key && !x.text.is_empty()), "deterministic {key} section present");
        }
    }
    let (status, body) = hook(&server, CKD_PATIENT).await;
    assert_eq!(status, 200);
    let card = &body["cards"][0];
    assert_eq!(card["uuid"], s.output_id.as_str());
    let summary = card["summary"].as_str().expect("summary");
    assert!(!summary.is_empty() && summary.chars().count() <= 140, "summary within 140 characters: {summary}");
    assert!(summary.contains("14 active problems") && summary.contains("7 medications"), "{summary}");
    assert_eq!(card["indicator"], "info");
    assert_eq!(card["source"]["label"], "Chartline");
    let detail = card["detail"].as_str().expect("markdown detail");
    assert!(detail.contains("AI-generated") && detail.contains("### Active problems") && detail.contains("[Condition/"), "{detail}");

    // The links resolve: the Composition (AI-tagged) and its Provenance.
    let (status, comp) = server.get(&format!("/Composition/{}", s.output_id)).await;
    assert_eq!(status, 200, "{comp}");
    assert_eq!(comp["meta"]["security"][0]["code"], "AIAST");
    assert_eq!(comp["subject"]["reference"], format!("Patient/{CKD_PATIENT}"));
    chartline_fhir::validate_resource(&chartline_fhir::Json::from(&comp), &chartline_fhir::Limits::default()).expect("the Composition is valid FHIR");
    let (status, bundle) = server.get(&format!("/Provenance?target=Composition/{}", s.output_id)).await;
    assert_eq!((status, bundle["total"].as_u64()), (200, Some(1)), "{bundle}");
    let prov = &bundle["entry"][0]["resource"];
    chartline_fhir::validate_resource(&chartline_fhir::Json::from(prov), &chartline_fhir::Limits::default()).expect("the Provenance is valid FHIR");
    let device = prov["agent"][0]["who"]["reference"].as_str().expect("a Device agent");
    let (status, dev) = server.get(&format!("/{device}")).await;
    assert_eq!(status, 200);
    assert_eq!(dev["version"][0]["value"], "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "the Device pins the weights");
    let entities: Vec<&str> = prov["entity"].as_array().expect("entities").iter().filter_map(|e| e["what"]["reference"].as_str()).collect();
    let pr = s.provenance.clone().expect("provenance");
    assert_eq!(entities.len(), pr.inputs.len() + 2, "inputs, the prompt and the model card");
    assert!(entities.iter().any(|e| e.starts_with("DocumentReference/prompt-")));
    assert!(entities.iter().any(|e| e.starts_with("DocumentReference/model-card-")));
    for e in entities.iter().filter(|e| e.contains("/_history/")) {
        let (status, _) = server.get(&format!("/{e}")).await;
        assert_eq!(status, 200, "input version {e} is readable");
    }
    // The summary's own resources do not make a new summary job.
    let pending: i64 = sqlx::query_scalar("select count(*) from summary_job").fetch_one(&pool).await.expect("count");
    assert_eq!(pending, 1, "only the job from ingest is pending, none from storing the summary");

    // Feedback is stored.
    let fb = json!({"feedback": [{"card": s.output_id, "outcome": "accepted", "outcomeTimestamp": "2026-11-29T10:00:00Z"}]});
    let r = server.http.post(format!("{}/cds-services/chart-summary/feedback", server.http_root())).json(&fb).send().await.expect("sent");
    assert_eq!(r.status().as_u16(), 200);
    let n: i64 = sqlx::query_scalar("select count(*) from cds_feedback where card_uuid = $1").bind(&s.output_id).fetch_one(&pool).await.expect("count");
    assert_eq!(n, 1);
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn every_citation_of_the_model_resolves_or_is_flagged(pool: PgPool) {
    let server = start_server_with_model(pool, SummaryConfig { token_budget: 1200, max_tokens: 48, ..SummaryConfig::default() }).await;
    load(&server, &[CKD_PATIENT]).await;
    let s = summarize(&server, CKD_PATIENT).await;
    let prov = s.provenance.clone().expect("provenance");
    let inputs: std::collections::BTreeSet<String> = prov.inputs.iter().map(|r| format!("{}/{}", r.resource_type, r.id)).collect();
    let mut found = 0;
    let mut verified = 0;
    for st in &s.statements {
        found += st.citations.len();
        for c in &st.citations {
            if inputs.contains(c) {
                verified += 1;
                let (status, _) = server.get(&format!("/{c}")).await;
                assert_eq!(status, 200, "verified citation {c} resolves");
                assert!(!st.unverified.contains(c));
            } else {
                assert!(st.unverified.contains(c), "a citation outside the prompt is flagged: {c}");
            }
        }
        assert_eq!(st.supported, !st.citations.is_empty() && st.unverified.is_empty(), "{st:?}");
    }
    assert_eq!(s.citations_found as usize, found);
    assert_eq!(s.citations_verified as usize, verified);
    assert_eq!(s.unsupported_statements as usize, s.statements.iter().filter(|x| !x.supported).count());
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn altering_any_provenance_row_breaks_the_chain_at_that_row_and_replay_reproduces(pool: PgPool) {
    let server = start_server_with_model(pool.clone(), quick()).await;
    let other = "098fc002-b87e-49dc-4b8e-8900a1bc8661";
    load(&server, &[CKD_PATIENT, other]).await;
    let a = summarize(&server, CKD_PATIENT).await;
    let b = summarize(&server, other).await;
    let c = summarize(&server, CKD_PATIENT).await;
    let seqs: Vec<i64> = [&a, &b, &c].iter().map(|s| s.provenance.as_ref().expect("provenance").chain_seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(b.provenance.as_ref().map(|p| p.prev_hash.clone()), a.provenance.as_ref().map(|p| p.row_hash.clone()), "rows link");

    let mut audit = audit(&server).await;
    let v = audit.verify_chain(VerifyChainRequest {}).await.expect("verify").into_inner();
    assert!(v.ok && v.rows_checked == 3, "{v:?}");

    // Replay of a greedy output reproduces it.
    let r = audit.replay(ReplayRequest { output_id: b.output_id.clone() }).await.expect("replay").into_inner();
    assert!(r.same_weights);
    assert!(r.matches, "greedy replay must reproduce the output: {} vs {}", r.recorded_output_sha256, r.replayed_output_sha256);

    // Listing by patient.
    let listed = audit.list_outputs(ListOutputsRequest { patient_id: CKD_PATIENT.into(), ..Default::default() }).await.expect("list").into_inner();
    assert_eq!(listed.outputs.len(), 2);
    assert_eq!(listed.outputs[0].output_id, c.output_id, "newest first");

    // The table refuses UPDATE in normal use, and the service role has no such right.
    let err = sqlx::query("update provenance set requester = 'x' where seq = 2").execute(&pool).await.expect_err("append-only");
    assert!(err.to_string().contains("append-only"), "{err}");
    let mut tx = pool.begin().await.expect("tx");
    sqlx::query("set local role chartline_service").execute(&mut *tx).await.expect("role");
    let err = sqlx::query("delete from provenance").execute(&mut *tx).await.expect_err("no delete for the service role");
    assert!(err.to_string().contains("permission denied"), "{err}");
    drop(tx);
    // The same role can do its ordinary work: read outputs, append nothing behind the chain.
    let mut tx = pool.begin().await.expect("tx");
    sqlx::query("set local role chartline_service").execute(&mut *tx).await.expect("role");
    let n: i64 = sqlx::query_scalar("select count(*) from ai_output").fetch_one(&mut *tx).await.expect("the service role reads outputs");
    assert_eq!(n, 3);
    let err = sqlx::query("update ai_output set narrative = ''").execute(&mut *tx).await.expect_err("outputs are append-only for the role");
    assert!(err.to_string().contains("permission denied"), "{err}");
    drop(tx);

    // Someone with superuser rights edits row 2 behind the trigger's back: the chain breaks there.
    sqlx::query("alter table provenance disable trigger provenance_no_update").execute(&pool).await.expect("disable");
    sqlx::query("update provenance set prompt_text = prompt_text || ' ' where seq = 2").execute(&pool).await.expect("tamper");
    let v = audit.verify_chain(VerifyChainRequest {}).await.expect("verify").into_inner();
    assert!(!v.ok);
    assert_eq!((v.first_broken_seq, v.first_broken_output_id.as_str()), (2, b.output_id.as_str()), "{v:?}");
    sqlx::query("update provenance set prompt_text = rtrim(prompt_text, ' ') where seq = 2").execute(&pool).await.expect("restore");
    assert!(audit.verify_chain(VerifyChainRequest {}).await.expect("verify").into_inner().ok, "restored");
    // Editing the stored output text itself is caught too.
    sqlx::query("update ai_output set narrative = narrative || '!' where id = $1::uuid").bind(&c.output_id).execute(&pool).await.expect("tamper");
    let v = audit.verify_chain(VerifyChainRequest {}).await.expect("verify").into_inner();
    assert_eq!(v.first_broken_seq, 3, "{v:?}");
    assert!(v.reason.contains("output"), "{}", v.reason);
    // Over REST as well.
    let rest: Value = server.http.get(format!("{}/audit/verify", server.http_root())).send().await.expect("sent").json().await.expect("json");
    assert_eq!((rest["ok"].as_bool(), rest["first_broken_seq"].as_i64()), (Some(false), Some(3)));
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn hooks_for_unknown_patients_and_malformed_requests(pool: PgPool) {
    let server = start_server_with_model(pool.clone(), quick()).await;
    let (status, body) = hook(&server, "nobody-here").await;
    assert_eq!((status, body["cards"].as_array().map(Vec::len)), (200, Some(0)), "unknown patient: no cards, no failure");
    let jobs: i64 = sqlx::query_scalar("select count(*) from summary_job").fetch_one(&pool).await.expect("count");
    assert_eq!(jobs, 0, "no job for a patient that does not exist");
    let url = format!("{}/cds-services/chart-summary", server.http_root());
    for bad in [
        json!({"hook": "patient-view"}),
        json!({"hook": "patient-view", "hookInstance": "not-a-uuid", "context": {"userId": "u", "patientId": "p"}}),
        json!({"hook": "order-sign", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "context": {"userId": "u", "patientId": "p"}}),
        json!({"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "context": {"patientId": "p"}}),
    ] {
        let r = server.http.post(&url).json(&bad).send().await.expect("sent");
        assert_eq!(r.status().as_u16(), 400, "{bad}");
        let reason: Value = r.json().await.expect("json");
        assert!(reason["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let r = server.http.post(&url).header("content-type", "application/json").body("{not json").send().await.expect("sent");
    assert_eq!(r.status().as_u16(), 400);
    let mut c = SummaryServiceClient::connect(server.grpc.clone()).await.expect("connect");
    let err = c.summarize(SummarizeRequest { patient_id: "nobody-here".into(), requester: String::new() }).await.expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// A MedGemma-shaped multimodal checkpoint (tiny, random weights, the real tensor names)
/// serves the summary: the chart's images go from the store through the timeline's
/// attachment API into the model, provenance pins their bytes, and replay fetches them
/// again and reproduces the output.
#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn a_multimodal_model_sees_the_charts_images_and_replay_reproduces(pool: PgPool) {
    // sha256 and base64 by PostgreSQL: the tests add no crypto of their own.
    async fn sha256_hex(pool: &PgPool, bytes: &[u8]) -> String {
        sqlx::query_scalar("select encode(sha256($1), 'hex')").bind(bytes).fetch_one(pool).await.expect("sha256")
    }
    async fn base64(pool: &PgPool, bytes: &[u8]) -> String {
        sqlx::query_scalar("select translate(encode($1, 'base64'), E'\\n', '')").bind(bytes).fetch_one(pool).await.expect("base64")
    }
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let config = SummaryConfig { token_budget: 1500, max_tokens: 4, max_images: 2 };
    let server = tests::start_server_serving(pool.clone(), config.clone(), None, fixtures.join("tiny-medgemma")).await;
    let images = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/images");
    let read = |rel: &str| std::fs::read(images.join(rel)).expect("fixture image");
    let (png, dicom) = (read("cxr/nih-cxr14-00000001_000.png"), read("dicom/RG1_J2KI.dcm"));
    let (png64, dicom64) = (base64(&pool, &png).await, base64(&pool, &dicom).await);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:6f1c0a52-3d2e-4f7b-9d61-0b3c7c1a9e01", "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "name": [{"family": "Imaging", "given": ["Test"]}], "gender": "female", "birthDate": "1950-02-03"}},
        {"fullUrl": "urn:uuid:6f1c0a52-3d2e-4f7b-9d61-0b3c7c1a9e02", "request": {"method": "POST", "url": "DocumentReference"},
         "resource": {"resourceType": "DocumentReference", "status": "current",
                      "subject": {"reference": "urn:uuid:6f1c0a52-3d2e-4f7b-9d61-0b3c7c1a9e01"}, "date": "2024-03-01T10:00:00Z",
                      "type": {"text": "Chest X-ray"},
                      "content": [{"attachment": {"contentType": "image/png", "title": "CXR PA", "data": png64}}]}},
        {"fullUrl": "urn:uuid:6f1c0a52-3d2e-4f7b-9d61-0b3c7c1a9e03", "request": {"method": "POST", "url": "DiagnosticReport"},
         "resource": {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "Chest radiograph"},
                      "subject": {"reference": "urn:uuid:6f1c0a52-3d2e-4f7b-9d61-0b3c7c1a9e01"}, "effectiveDateTime": "2024-05-01T10:00:00Z",
                      "presentedForm": [{"contentType": "application/dicom", "title": "CR chest", "data": dicom64}]}}
    ]});
    let (status, response) = server.post("", serde_json::to_vec(&bundle).expect("json")).await;
    assert_eq!(status, 200, "{response}");
    let patient = response["entry"][0]["response"]["location"].as_str().expect("location").split('/').nth(1).expect("id").to_owned();

    let s = summarize(&server, &patient).await;
    assert_eq!(s.finish_reason, "length");
    let p = s.provenance.expect("provenance");
    let params: Value = serde_json::from_str(&p.parameters_json).expect("parameters");
    let used = params["images"].as_array().expect("images recorded");
    // Newest first: the DICOM report, then the PNG document.
    assert_eq!(used.len(), 2);
    let (dicom_sha, png_sha) = (sha256_hex(&pool, &dicom).await, sha256_hex(&pool, &png).await);
    assert_eq!((used[0]["resource_type"].as_str(), used[0]["sha256"].as_str()), (Some("DiagnosticReport"), Some(dicom_sha.as_str())));
    assert_eq!((used[1]["resource_type"].as_str(), used[1]["sha256"].as_str()), (Some("DocumentReference"), Some(png_sha.as_str())));
    let prompt_text: String = sqlx::query_scalar("select prompt_text from provenance where output_id = $1::uuid")
        .bind(&s.output_id)
        .fetch_one(&pool)
        .await
        .expect("prompt");
    assert_eq!(prompt_text.matches("<start_of_image>").count(), 2, "one placeholder per image");
    assert_ne!(p.prompt_sha256, sha256_hex(&pool, prompt_text.as_bytes()).await, "the prompt hash covers the images, not only the text");

    // Replay fetches the same image versions and reproduces the greedy output.
    let mut audit = audit(&server).await;
    let r = audit.replay(ReplayRequest { output_id: s.output_id.clone() }).await.expect("replay").into_inner();
    assert!(r.matches, "replay with the same images reproduces the output");

    // A newer chart image the model cannot read (a corrupt PNG) does not block the
    // patient's summary: it is made from the text, and the record holds no images.
    let mut corrupt = b"\x89PNG\r\n\x1a\n".to_vec();
    corrupt.extend_from_slice(&[0x42; 64]);
    let corrupt64 = base64(&pool, &corrupt).await;
    let doc = json!({"resourceType": "DocumentReference", "status": "current",
                     "subject": {"reference": format!("Patient/{patient}")}, "date": "2024-06-01T10:00:00Z",
                     "type": {"text": "Chest X-ray"},
                     "content": [{"attachment": {"contentType": "image/png", "title": "CXR AP", "data": corrupt64}}]});
    let (status, created) = server.post("/DocumentReference", serde_json::to_vec(&doc).expect("json")).await;
    assert_eq!(status, 201, "{created}");
    let s3 = summarize(&server, &patient).await;
    let params3: Value = serde_json::from_str(&s3.provenance.expect("provenance").parameters_json).expect("parameters");
    assert!(params3.get("images").is_none(), "summarized without the unreadable images");

    // With max_images 0 the same model gets no images and the record has none.
    let server2 = tests::start_server_serving(pool.clone(), SummaryConfig { max_images: 0, ..config }, None, fixtures.join("tiny-medgemma")).await;
    let s2 = summarize(&server2, &patient).await;
    let params2: Value = serde_json::from_str(&s2.provenance.expect("provenance").parameters_json).expect("parameters");
    assert!(params2.get("images").is_none());
}
