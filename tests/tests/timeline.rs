//! Timelines and prompts over gRPC, on the fixture patients, counted by the real tokenizer.

use std::collections::{BTreeMap, BTreeSet};

use chartline_proto::v1::timeline_service_client::TimelineServiceClient;
use chartline_proto::v1::{BuildPromptRequest, BuildPromptResponse, GetTimelineRequest};
use serde_json::Value;
use sqlx::PgPool;
use tests::{read_json, start_server, synthea_bundles};
use tonic::transport::Channel;

const CKD_PATIENT: &str = "4b86befa-fa7e-9285-615f-e081dab3f93c";

/// A fixed reading time, after every fixture event, so prompts are reproducible.
fn as_of() -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: 1_790_000_000, nanos: 0 }
}

async fn client(grpc: &str) -> TimelineServiceClient<Channel> {
    TimelineServiceClient::connect(grpc.to_owned()).await.expect("connect")
}

async fn prompt(c: &mut TimelineServiceClient<Channel>, patient: &str, budget: i32) -> BuildPromptResponse {
    c.build_prompt(BuildPromptRequest {
        patient_id: patient.into(),
        task: "chart_summary".into(),
        token_budget: budget,
        as_of: Some(as_of()),
        ..Default::default()
    })
        .await
        .unwrap_or_else(|e| panic!("prompt for {patient}: {e}"))
        .into_inner()
}

/// `[Type/id]` tags in a text (resource types only: units such as `[Mass/volume]` are not tags).
fn tags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find('[') {
        rest = &rest[i + 1..];
        if let Some(j) = rest.find(']') {
            let t = &rest[..j];
            if let Some((ty, id)) = t.split_once('/') {
                if chartline_fhir::is_resource_type(ty) && chartline_fhir::is_valid_id(id) {
                    out.insert(t.to_owned());
                }
            }
            rest = &rest[j..];
        }
    }
    out
}

fn section_tags(p: &BuildPromptResponse, key: &str) -> BTreeSet<String> {
    p.sections.iter().find(|s| s.key == key).map(|s| tags(&s.text)).unwrap_or_default()
}

/// The id Chartline gives a Bundle entry: its urn:uuid.
fn entry_id(e: &Value) -> String {
    e["fullUrl"].as_str().and_then(|u| u.strip_prefix("urn:uuid:")).expect("urn:uuid fullUrl").to_owned()
}

fn active(bundle: &Value, ty: &str) -> BTreeSet<String> {
    bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["resource"]["resourceType"] == ty)
        .filter(|e| {
            let r = &e["resource"];
            match ty {
                "Condition" | "AllergyIntolerance" => r["clinicalStatus"]["coding"][0]["code"] == "active",
                _ => r["status"] == "active",
            }
        })
        .map(|e| format!("{ty}/{}", entry_id(e)))
        .collect()
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn problems_medications_and_allergies_hold_exactly_the_active_items_of_every_patient(pool: PgPool) {
    let server = start_server(pool, chartline_fhir::Limits::default()).await;
    let files = synthea_bundles();
    server.load_synthea(&files).await;
    let mut c = client(&server.grpc).await;
    let mut checked = 0;
    for f in &files[2..] {
        let bundle = read_json(f);
        let patient = bundle["entry"].as_array().expect("entries").iter().find(|e| e["resource"]["resourceType"] == "Patient").map(entry_id).expect("a patient");
        let p = prompt(&mut c, &patient, 200_000).await;
        assert!(p.omitted.is_empty(), "{patient}: a large budget omits nothing");
        assert_eq!(section_tags(&p, "problems"), active(&bundle, "Condition"), "{patient}: active problems");
        let meds: BTreeSet<String> = active(&bundle, "MedicationRequest").union(&active(&bundle, "MedicationStatement")).cloned().collect();
        assert_eq!(section_tags(&p, "medications"), meds, "{patient}: active medications");
        assert_eq!(section_tags(&p, "allergies"), active(&bundle, "AllergyIntolerance"), "{patient}: active allergies");
        assert!(p.prompt.contains(&format!("[Patient/{patient}]")), "the header cites the patient");
        let cited: BTreeSet<String> = p.citations.iter().map(|r| format!("{}/{}", r.resource_type, r.id)).collect();
        let chart = p.prompt.split_once("Chart as of").map(|(_, c)| c).expect("the chart follows the instructions");
        assert_eq!(tags(chart), cited, "{patient}: the citation list is exactly the tags in the chart");
        assert!(p.citations.iter().all(|r| r.version_id >= 1), "citations carry versions");
        checked += 1;
    }
    assert_eq!(checked, files.len() - 2);
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn the_ckd_diabetes_patient_shows_hba1c_and_egfr_trends(pool: PgPool) {
    let server = start_server(pool, chartline_fhir::Limits::default()).await;
    let files = synthea_bundles();
    let patient = files.iter().find(|f| f.to_string_lossy().contains(CKD_PATIENT)).expect("fixture").clone();
    server.load_synthea(&[files[0].clone(), files[1].clone(), patient]).await;
    let mut c = client(&server.grpc).await;
    let p = prompt(&mut c, CKD_PATIENT, 200_000).await;
    let results = &p.sections.iter().find(|s| s.key == "results").expect("a results section").text;
    for name in ["Hemoglobin A1c", "Estimated Glomerular Filtration Rate"] {
        let line = results.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name} in results:\n{results}"));
        assert!(line.contains("trend over") && line.contains("min ") && line.contains("max "), "{name} carries its trend: {line}");
        assert!(["rising", "falling", "stable"].iter().any(|d| line.contains(d)), "{name} has a direction: {line}");
    }
    let vitals = &p.sections.iter().find(|s| s.key == "vital_signs").expect("vital signs").text;
    assert!(vitals.contains("Systolic Blood Pressure") && vitals.contains("Body Mass Index"), "BP and BMI trends:\n{vitals}");
    assert!(p.prompt.contains("years old") || p.prompt.contains("deceased"), "age or death is stated");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn a_tiny_budget_keeps_the_most_important_lines_and_reports_what_it_omitted(pool: PgPool) {
    let server = start_server(pool, chartline_fhir::Limits::default()).await;
    let files = synthea_bundles();
    let patient = files.iter().find(|f| f.to_string_lossy().contains(CKD_PATIENT)).expect("fixture").clone();
    server.load_synthea(&[files[0].clone(), files[1].clone(), patient]).await;
    let mut c = client(&server.grpc).await;
    let full = prompt(&mut c, CKD_PATIENT, 200_000).await;
    for budget in [400, 800, 1500, 4000] {
        let p = prompt(&mut c, CKD_PATIENT, budget).await;
        assert!(p.token_count as i32 <= budget, "budget {budget} exceeded: {}", p.token_count);
        assert!(!p.omitted.is_empty(), "budget {budget} must omit something");
        assert!(p.prompt.contains("Omitted for length:"), "the prompt tells the model it is cut");
        let included = |key: &str| p.sections.iter().find(|s| s.key == key).map_or(0, |s| s.lines_included);
        let total = |key: &str| full.sections.iter().find(|s| s.key == key).map_or(0, |s| s.lines_included);
        // The priority order: nothing of a lower class is kept while a higher class lost lines.
        let order = ["allergies", "problems", "medications", "results"];
        for (i, hi) in order.iter().enumerate() {
            if included(hi) < total(hi) {
                for lo in ["encounters", "past_problems", "past_medications", "immunizations"] {
                    assert_eq!(included(lo), 0, "budget {budget}: {lo} kept while {hi} lost lines (order {i})");
                }
            }
        }
        let omitted_sum: u32 = p.omitted.values().sum();
        let lost: u32 = full.sections.iter().map(|s| s.lines_included as u32).sum::<u32>()
            - p.sections.iter().map(|s| s.lines_included as u32).sum::<u32>();
        assert_eq!(omitted_sum, lost, "omission counts add up");
    }
    let tiny = prompt(&mut c, CKD_PATIENT, 400).await;
    assert!(tiny.sections.iter().find(|s| s.key == "problems").is_some_and(|s| s.lines_included > 0), "400 tokens still hold problems");
    let small = prompt(&mut c, CKD_PATIENT, 3000).await;
    for key in ["allergies", "problems", "medications"] {
        assert_eq!(
            small.sections.iter().find(|s| s.key == key).map(|s| s.lines_included),
            full.sections.iter().find(|s| s.key == key).map(|s| s.lines_included),
            "at 3000 tokens every {key} line fits"
        );
    }
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn two_ingests_in_different_orders_give_the_same_prompt(pool: PgPool) {
    let files = synthea_bundles();
    let patient = files.iter().find(|f| f.to_string_lossy().contains(CKD_PATIENT)).expect("fixture").clone();
    let other = files[3].clone();

    let server = start_server(pool.clone(), chartline_fhir::Limits::default()).await;
    server.load_synthea(&[files[0].clone(), files[1].clone(), patient.clone(), other.clone()]).await;
    let mut c = client(&server.grpc).await;
    let first = prompt(&mut c, CKD_PATIENT, 3000).await;
    let again = prompt(&mut c, CKD_PATIENT, 3000).await;
    assert_eq!(first.prompt_sha256, again.prompt_sha256, "same data, same prompt");

    // A second database, loaded in another order with the patient's entries reversed.
    let name = format!("chartline_order_{}", std::process::id());
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}"))).execute(&pool).await.expect("create database");
    let opts = (*pool.connect_options()).clone().database(&name);
    let pool2 = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(opts).await.expect("connect");
    chartline_store::MIGRATOR.run(&pool2).await.expect("migrate");
    let server2 = start_server(pool2.clone(), chartline_fhir::Limits::default()).await;
    server2.load_synthea(&[files[0].clone(), files[1].clone(), other]).await;
    let mut reversed = read_json(&patient);
    reversed["entry"].as_array_mut().expect("entries").reverse();
    let (status, body) = server2.post("", serde_json::to_vec(&reversed).expect("json")).await;
    assert_eq!(status, 200, "{body}");
    let mut c2 = client(&server2.grpc).await;
    let second = prompt(&mut c2, CKD_PATIENT, 3000).await;
    assert_eq!(first.prompt, second.prompt, "insertion order must not change the prompt");
    assert_eq!(first.prompt_sha256, second.prompt_sha256);
    server2.running.stop().await.expect("stop");
    pool2.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("drop database {name} with (force)"))).execute(&pool).await.expect("drop");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn unknown_patients_and_bad_requests_are_refused_clearly(pool: PgPool) {
    let server = start_server(pool, chartline_fhir::Limits::default()).await;
    let files = synthea_bundles();
    let patient = files.iter().find(|f| f.to_string_lossy().contains(CKD_PATIENT)).expect("fixture").clone();
    server.load_synthea(&[files[0].clone(), files[1].clone(), patient]).await;
    let mut c = client(&server.grpc).await;
    let req = |patient: &str, task: &str, budget: i32| BuildPromptRequest {
        patient_id: patient.into(),
        task: task.into(),
        token_budget: budget,
        as_of: Some(as_of()),
        ..Default::default()
    };
    let err = c.build_prompt(req("no-such-patient", "chart_summary", 1000)).await.expect_err("unknown patient");
    assert_eq!(err.code(), tonic::Code::NotFound);
    for budget in [-5, 0, 63, 2_000_000_000] {
        let err = c.build_prompt(req(CKD_PATIENT, "chart_summary", budget)).await.expect_err("bad budget");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "budget {budget}");
        assert!(err.message().contains("token_budget"), "names the field: {}", err.message());
    }
    let err = c.build_prompt(req(CKD_PATIENT, "write_poem", 1000)).await.expect_err("unknown task");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("task"));

    let err = c.get_timeline(GetTimelineRequest { patient_id: "nobody".into(), ..Default::default() }).await.expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .get_timeline(GetTimelineRequest { patient_id: CKD_PATIENT.into(), kinds: vec!["dreams".into()], ..Default::default() })
        .await
        .expect_err("bad kind");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn the_timeline_is_in_time_order_with_versions_and_filters(pool: PgPool) {
    let server = start_server(pool, chartline_fhir::Limits::default()).await;
    let files = synthea_bundles();
    let patient = files.iter().find(|f| f.to_string_lossy().contains(CKD_PATIENT)).expect("fixture").clone();
    server.load_synthea(&[files[0].clone(), files[1].clone(), patient]).await;
    let mut c = client(&server.grpc).await;
    let all = c.get_timeline(GetTimelineRequest { patient_id: CKD_PATIENT.into(), ..Default::default() }).await.expect("timeline").into_inner();
    assert!(all.events.len() > 2000, "a long chart: {}", all.events.len());
    let times: Vec<i64> = all.events.iter().filter_map(|e| e.time.as_ref().map(|t| t.seconds)).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "time order");
    assert!(all.events.iter().all(|e| e.source.as_ref().is_some_and(|s| s.version_id == 1)));
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for e in &all.events {
        *kinds.entry(e.kind.clone()).or_default() += 1;
    }
    for k in ["condition", "observation", "medication", "encounter", "immunization", "procedure", "document"] {
        assert!(kinds.contains_key(k), "{k} events present: {kinds:?}");
    }
    let labs = c
        .get_timeline(GetTimelineRequest { patient_id: CKD_PATIENT.into(), kinds: vec!["condition".into()], from: Some(prost_types::Timestamp { seconds: 1_300_000_000, nanos: 0 }), to: None })
        .await
        .expect("filtered")
        .into_inner();
    assert!(!labs.events.is_empty());
    assert!(labs.events.iter().all(|e| e.kind == "condition" && e.time.as_ref().is_none_or(|t| t.seconds >= 1_300_000_000)));
}

// ---------------------------------------------------------------------------------------
// Images from the chart: discovery, the Imaging section, attachment to the prompt, GetAttachment.

mod images {
    use super::*;
    use chartline_proto::v1::{GetAttachmentRequest, ResourceRef};

    const PATIENT: &str = "5d0c1a54-7f3e-4c5a-9f11-2b7d9e0a6c01";
    /// Chest X-ray PNG, inline in a DocumentReference (2024-03-01).
    const CXR_DOC: &str = "6a1f0e2b-3c4d-4e5f-8a9b-0c1d2e3f4a01";
    /// Fundus JPEG as a Media whose url is `Binary/{FUNDUS_BIN}` (2024-02-15).
    const FUNDUS_MEDIA: &str = "6a1f0e2b-3c4d-4e5f-8a9b-0c1d2e3f4a02";
    const FUNDUS_BIN: &str = "6a1f0e2b-3c4d-4e5f-8a9b-0c1d2e3f4a03";
    /// JPEG 2000 DICOM inline in a DiagnosticReport's presentedForm (2024-02-01).
    const DICOM_REPORT: &str = "6a1f0e2b-3c4d-4e5f-8a9b-0c1d2e3f4a04";
    /// A text note that quotes the image placeholder (2024-03-05).
    const NOTE_DOC: &str = "6a1f0e2b-3c4d-4e5f-8a9b-0c1d2e3f4a05";
    /// An image at an external URL (2024-03-10): listed, not retrievable.
    const REMOTE_DOC: &str = "6a1f0e2b-3c4d-4e5f-8a9b-0c1d2e3f4a06";
    /// An entered-in-error image (2024-03-12): excluded.
    const ERROR_DOC: &str = "6a1f0e2b-3c4d-4e5f-8a9b-0c1d2e3f4a07";
    /// The fundus Binary again, by the Bundle's `urn:uuid:` (ingest rewrites it) (2024-01-10).
    const URN_DOC: &str = "6a1f0e2b-3c4d-4e5f-8a9b-0c1d2e3f4a08";

    fn image_bytes(rel: &str) -> Vec<u8> {
        let p = tests::fixtures().join("images").join(rel);
        std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
    }
    fn png() -> Vec<u8> {
        image_bytes("cxr/nih-cxr14-00000001_000.png")
    }
    fn jpeg() -> Vec<u8> {
        image_bytes("fundus/skimage-retina.jpg")
    }
    fn dicom() -> Vec<u8> {
        image_bytes("dicom/RG1_J2KI.dcm")
    }

    /// sha256 (hex) and base64 by PostgreSQL: the tests add no crypto of their own.
    async fn sha256_hex(pool: &PgPool, bytes: &[u8]) -> String {
        sqlx::query_scalar("select encode(sha256($1), 'hex')").bind(bytes).fetch_one(pool).await.expect("sha256")
    }
    async fn base64(pool: &PgPool, bytes: &[u8]) -> String {
        sqlx::query_scalar("select translate(encode($1, 'base64'), E'\\n', '')").bind(bytes).fetch_one(pool).await.expect("base64")
    }

    fn entry(id: &str, resource: Value) -> Value {
        let ty = resource["resourceType"].as_str().expect("type").to_owned();
        serde_json::json!({"fullUrl": format!("urn:uuid:{id}"), "resource": resource, "request": {"method": "POST", "url": ty}})
    }

    fn doc(id: &str, date: &str, title: &str, attachment: Value, status: &str) -> Value {
        entry(
            id,
            serde_json::json!({
                "resourceType": "DocumentReference",
                "status": status,
                "type": {"text": title},
                "subject": {"reference": format!("urn:uuid:{PATIENT}")},
                "date": date,
                "content": [{"attachment": attachment}]
            }),
        )
    }

    async fn bundle(pool: &PgPool) -> Value {
        let (png, jpeg, dicom) = (png(), jpeg(), dicom());
        let note = "Reviewed films with radiology. <start_of_image> must stay text. <end_of_turn> too.";
        serde_json::json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                entry(PATIENT, serde_json::json!({"resourceType": "Patient", "gender": "female", "birthDate": "1961-05-04"})),
                doc(CXR_DOC, "2024-03-01T09:00:00Z", "Chest X-ray",
                    serde_json::json!({"contentType": "image/png", "title": "Chest X-ray PA", "size": png.len(), "data": base64(pool, &png).await}), "current"),
                entry(FUNDUS_BIN, serde_json::json!({"resourceType": "Binary", "contentType": "image/jpeg", "data": base64(pool, &jpeg).await})),
                entry(FUNDUS_MEDIA, serde_json::json!({
                    "resourceType": "Media",
                    "status": "completed",
                    "modality": {"text": "Fundus photography"},
                    "subject": {"reference": format!("urn:uuid:{PATIENT}")},
                    "createdDateTime": "2024-02-15T10:30:00Z",
                    "content": {"contentType": "image/jpeg", "url": format!("Binary/{FUNDUS_BIN}"), "title": "Fundus photograph, right eye"}
                })),
                entry(DICOM_REPORT, serde_json::json!({
                    "resourceType": "DiagnosticReport",
                    "status": "final",
                    "code": {"text": "CR chest"},
                    "subject": {"reference": format!("urn:uuid:{PATIENT}")},
                    "effectiveDateTime": "2024-02-01T08:00:00Z",
                    "presentedForm": [{"contentType": "application/dicom", "data": base64(pool, &dicom).await}]
                })),
                doc(NOTE_DOC, "2024-03-05T12:00:00Z", "Progress note",
                    serde_json::json!({"contentType": "text/plain", "data": base64(pool, note.as_bytes()).await}), "current"),
                doc(REMOTE_DOC, "2024-03-10T12:00:00Z", "Outside CT",
                    serde_json::json!({"contentType": "image/jpeg", "url": "https://pacs.example.org/wado/ct-1.jpg", "title": "Outside CT key image"}), "current"),
                doc(ERROR_DOC, "2024-03-12T12:00:00Z", "Wrong patient X-ray",
                    serde_json::json!({"contentType": "image/png", "data": base64(pool, &png[..64]).await}), "entered-in-error"),
                doc(URN_DOC, "2024-01-10T12:00:00Z", "Fundus (earlier)",
                    serde_json::json!({"contentType": "image/jpeg", "url": format!("urn:uuid:{FUNDUS_BIN}")}), "current"),
            ]
        })
    }

    async fn setup(pool: &PgPool) -> (tests::TestServer, TimelineServiceClient<Channel>) {
        let server = start_server(pool.clone(), chartline_fhir::Limits::default()).await;
        let b = bundle(pool).await;
        let (status, body) = server.post("", serde_json::to_vec(&b).expect("json")).await;
        assert_eq!(status, 200, "the image Bundle ingests: {body}");
        let c = client(&server.grpc).await;
        (server, c)
    }

    fn at(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }
    /// 2025-01-01T00:00:00Z: after every image.
    const AS_OF: i64 = 1_735_689_600;

    async fn prompt_with(c: &mut TimelineServiceClient<Channel>, budget: i32, max_images: u32, image_tokens: u32, as_of: i64) -> BuildPromptResponse {
        c.build_prompt(BuildPromptRequest {
            patient_id: PATIENT.into(),
            task: "chart_summary".into(),
            token_budget: budget,
            as_of: Some(at(as_of)),
            max_images,
            image_tokens,
        })
        .await
        .unwrap_or_else(|e| panic!("prompt: {e}"))
        .into_inner()
    }

    fn section<'a>(p: &'a BuildPromptResponse, key: &str) -> &'a str {
        p.sections.iter().find(|s| s.key == key).map(|s| s.text.as_str()).unwrap_or("")
    }

    fn src(ty: &str, id: &str) -> Option<ResourceRef> {
        Some(ResourceRef { resource_type: ty.into(), id: id.into(), version_id: 1 })
    }

    #[sqlx::test(migrator = "chartline_store::MIGRATOR")]
    async fn chart_images_are_listed_attached_and_served(pool: PgPool) {
        let (server, mut c) = setup(&pool).await;

        // max_images = 0: every image attachment is a cited fact line, nothing is attached.
        let p0 = prompt_with(&mut c, 200_000, 0, 0, AS_OF).await;
        let imaging = section(&p0, "images");
        let lines: Vec<&str> = imaging.lines().skip(1).collect();
        let expect = [
            ("Outside CT key image (image/jpeg; external, not retrievable)", format!("[DocumentReference/{REMOTE_DOC}]"), "2024-03-10"),
            ("Chest X-ray PA (image/png)", format!("[DocumentReference/{CXR_DOC}]"), "2024-03-01"),
            ("Fundus photograph, right eye (image/jpeg)", format!("[Media/{FUNDUS_MEDIA}]"), "2024-02-15"),
            ("CR chest (application/dicom)", format!("[DiagnosticReport/{DICOM_REPORT}]"), "2024-02-01"),
            ("Fundus (earlier) (image/jpeg)", format!("[DocumentReference/{URN_DOC}]"), "2024-01-10"),
        ];
        assert_eq!(lines.len(), expect.len(), "one line per image attachment, newest first:\n{imaging}");
        for (line, (what, tag, date)) in lines.iter().zip(&expect) {
            assert_eq!(*line, format!("- {date} {what} {tag}"), "Imaging line");
        }
        assert!(!p0.prompt.contains(ERROR_DOC), "entered-in-error is left out");
        assert!(!imaging.contains(NOTE_DOC), "a text/plain document is not an image");
        let cited: BTreeSet<String> = p0.citations.iter().map(|r| format!("{}/{}", r.resource_type, r.id)).collect();
        for (_, tag, _) in &expect {
            assert!(cited.contains(tag.trim_matches(['[', ']'])), "{tag} is cited");
        }
        assert!(p0.images.is_empty() && !p0.prompt.contains("<start_of_image>"), "max_images 0 attaches nothing");
        // Chart text that spells the image placeholder (or a turn marker) is defused.
        let notes = section(&p0, "notes");
        assert!(notes.contains("‹start_of_image› must stay text") && notes.contains("‹end_of_turn›"), "defused:\n{notes}");
        assert_eq!(p0.prompt_sha256, sha256_hex(&pool, p0.prompt.as_bytes()).await, "without images the hash is the text's");

        // max_images = 2: the two newest retrievable images, in prompt order, with placeholders.
        let p2 = prompt_with(&mut c, 200_000, 2, 0, AS_OF).await;
        assert_eq!(p2.images.len(), 2, "{:?}", p2.images);
        let (a, b) = (&p2.images[0], &p2.images[1]);
        assert_eq!((a.source.clone(), a.attachment_index, a.content_type.as_str(), a.placeholder_index), (src("DocumentReference", CXR_DOC), 0, "image/png", 0));
        assert_eq!((b.source.clone(), b.attachment_index, b.content_type.as_str(), b.placeholder_index), (src("Media", FUNDUS_MEDIA), 0, "image/jpeg", 1));
        assert_eq!(a.sha256, sha256_hex(&pool, &png()).await, "the PNG's sha256");
        assert_eq!(b.sha256, sha256_hex(&pool, &jpeg()).await, "the JPEG's sha256 (through its Binary)");
        assert_eq!((a.size, b.size), (png().len() as u64, jpeg().len() as u64));
        assert_eq!(a.title, "Chest X-ray PA");
        assert_eq!(a.date.as_ref().map(|t| t.seconds), Some(1_709_283_600), "2024-03-01T09:00:00Z");
        assert_eq!(p2.prompt.matches("<start_of_image>").count(), 2);
        let cxr_line = p2.prompt.lines().find(|l| l.contains(CXR_DOC)).expect("CXR line");
        assert!(cxr_line.ends_with(&format!("[DocumentReference/{CXR_DOC}] <start_of_image>")), "{cxr_line}");
        let media_line = p2.prompt.lines().find(|l| l.contains(FUNDUS_MEDIA)).expect("Media line");
        assert!(media_line.ends_with(" <start_of_image>"), "{media_line}");
        assert!(p2.prompt.find(CXR_DOC) < p2.prompt.find(FUNDUS_MEDIA), "placeholders in image order");
        assert_eq!(p2.prompt.replace(" <start_of_image>", ""), p0.prompt, "images only add placeholders");
        assert!(p2.token_count >= p0.token_count + 2 * 260, "each image costs 260 tokens: {} vs {}", p2.token_count, p0.token_count);
        // The hash covers the attached images, exactly as documented.
        let manifest = format!("chartline-prompt-images/1\n{}\n{}0 image/png {}\n1 image/jpeg {}\n", p2.prompt.len(), p2.prompt, a.sha256, b.sha256);
        assert_eq!(p2.prompt_sha256, sha256_hex(&pool, manifest.as_bytes()).await, "prompt_sha256 = documented manifest hash");
        let again = prompt_with(&mut c, 200_000, 2, 0, AS_OF).await;
        assert_eq!((again.prompt_sha256.as_str(), &again.images), (p2.prompt_sha256.as_str(), &p2.images), "deterministic");

        // A larger max_images attaches every retrievable image (the remote one never).
        let all = prompt_with(&mut c, 200_000, 32, 0, AS_OF).await;
        let got: Vec<(String, String)> = all.images.iter().map(|i| (i.source.as_ref().expect("source").id.clone(), i.content_type.clone())).collect();
        assert_eq!(
            got,
            [
                (CXR_DOC.to_owned(), "image/png".to_owned()),
                (FUNDUS_MEDIA.to_owned(), "image/jpeg".to_owned()),
                (DICOM_REPORT.to_owned(), "application/dicom".to_owned()),
                (URN_DOC.to_owned(), "image/jpeg".to_owned()),
            ]
        );
        assert_eq!(all.images[2].sha256, sha256_hex(&pool, &dicom()).await);
        assert_eq!(all.images[3].sha256, all.images[1].sha256, "the urn:uuid url was rewritten to the same Binary");

        // GetAttachment returns exactly the fixture bytes.
        for (ty, id, bytes, ct) in [
            ("DocumentReference", CXR_DOC, png(), "image/png"),
            ("Media", FUNDUS_MEDIA, jpeg(), "image/jpeg"),
            ("DiagnosticReport", DICOM_REPORT, dicom(), "application/dicom"),
            ("DocumentReference", URN_DOC, jpeg(), "image/jpeg"),
        ] {
            for version_id in [0, 1] {
                let r = c
                    .get_attachment(GetAttachmentRequest { source: Some(ResourceRef { resource_type: ty.into(), id: id.into(), version_id }), attachment_index: 0 })
                    .await
                    .unwrap_or_else(|e| panic!("{ty}/{id}: {e}"))
                    .into_inner();
                assert!(r.data[..] == bytes[..], "{ty}/{id}: the fixture's bytes");
                assert_eq!(r.content_type, ct);
                assert_eq!(r.sha256, sha256_hex(&pool, &bytes).await);
                assert_eq!(r.source, src(ty, id), "the version read");
            }
        }

        // One changed byte of an attached image changes the hash, not the text.
        let mut changed = jpeg();
        let mid = changed.len() / 2;
        changed[mid] ^= 0x01;
        let binary = serde_json::json!({"resourceType": "Binary", "id": FUNDUS_BIN, "contentType": "image/jpeg", "data": base64(&pool, &changed).await});
        let r = server
            .http
            .put(format!("{}/Binary/{FUNDUS_BIN}", server.fhir))
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(&binary).expect("json"))
            .send()
            .await
            .expect("PUT Binary");
        assert_eq!(r.status().as_u16(), 200, "Binary updated");
        let p2b = prompt_with(&mut c, 200_000, 2, 0, AS_OF).await;
        assert_eq!(p2b.prompt, p2.prompt, "same text");
        assert_ne!(p2b.prompt_sha256, p2.prompt_sha256, "another image byte, another prompt hash");
        assert_eq!(p2b.images[1].sha256, sha256_hex(&pool, &changed).await);
        assert_eq!(prompt_with(&mut c, 200_000, 0, 0, AS_OF).await.prompt_sha256, p0.prompt_sha256, "without images nothing changed");
    }

    #[sqlx::test(migrator = "chartline_store::MIGRATOR")]
    async fn a_tight_budget_attaches_fewer_images_and_says_so(pool: PgPool) {
        let (_server, mut c) = setup(&pool).await;
        let p0 = prompt_with(&mut c, 200_000, 0, 0, AS_OF).await;
        assert!(p0.omitted.is_empty());
        let base = p0.token_count as i32;
        // Room for every line and one 5,000-token image, not two.
        let one = prompt_with(&mut c, base + 5_000 + 100, 2, 5_000, AS_OF).await;
        assert_eq!(one.images.len(), 1, "one image fits");
        assert_eq!(one.images[0].source, src("DocumentReference", CXR_DOC), "the newest stays");
        assert_eq!(one.prompt.matches("<start_of_image>").count(), 1);
        assert_eq!(one.omitted.get("image_attachments"), Some(&1), "{:?}", one.omitted);
        assert!(one.prompt.contains("Omitted for length: 1 image attachment."), "the prompt says so");
        assert!(one.token_count as i32 <= base + 5_100 && one.token_count >= p0.token_count + 5_000);
        assert!(one.prompt.lines().any(|l| l.contains(FUNDUS_MEDIA) && !l.contains("<start_of_image>")), "its line stays, unattached");
        // No room for any image.
        let none = prompt_with(&mut c, base + 100, 2, 0, AS_OF).await;
        assert!(none.images.is_empty() && !none.prompt.contains("<start_of_image>"));
        assert_eq!(none.omitted.get("image_attachments"), Some(&2));
        assert!(none.prompt.contains("2 image attachments"));
        assert!(none.token_count as i32 <= base + 100);
        // as_of: the chart read earlier holds only the older images.
        let early = prompt_with(&mut c, 200_000, 2, 0, 1_707_523_200).await; // 2024-02-10
        let ids: Vec<String> = early.images.iter().map(|i| i.source.as_ref().expect("source").id.clone()).collect();
        assert_eq!(ids, [DICOM_REPORT, URN_DOC]);
        assert!(!early.prompt.contains(CXR_DOC) && !early.prompt.contains(FUNDUS_MEDIA), "later images are not in the chart yet");
        let err = c
            .build_prompt(BuildPromptRequest { patient_id: PATIENT.into(), token_budget: 10_000, max_images: 33, ..Default::default() })
            .await
            .expect_err("too many images");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("max_images"));
    }

    #[sqlx::test(migrator = "chartline_store::MIGRATOR")]
    async fn get_attachment_refuses_clearly(pool: PgPool) {
        let (_server, mut c) = setup(&pool).await;
        let get = |ty: &str, id: &str, version_id: i64, attachment_index: u32| GetAttachmentRequest {
            source: Some(ResourceRef { resource_type: ty.into(), id: id.into(), version_id }),
            attachment_index,
        };
        let cases = [
            (get("DocumentReference", "no-such-doc", 0, 0), tonic::Code::NotFound, "not found"),
            (get("DocumentReference", CXR_DOC, 7, 0), tonic::Code::NotFound, "not found"),
            (get("DocumentReference", CXR_DOC, 0, 3), tonic::Code::NotFound, "no attachment 3"),
            (get("Media", FUNDUS_MEDIA, 0, 1), tonic::Code::NotFound, "no attachment 1"),
            (get("DocumentReference", REMOTE_DOC, 0, 0), tonic::Code::FailedPrecondition, "never fetches remote"),
            (get("DocumentReference", ERROR_DOC, 0, 0), tonic::Code::FailedPrecondition, "entered-in-error"),
            (get("Observation", CXR_DOC, 0, 0), tonic::Code::InvalidArgument, "resource_type"),
            (get("DocumentReference", "bad id!", 0, 0), tonic::Code::InvalidArgument, "source.id"),
            (get("DocumentReference", CXR_DOC, -1, 0), tonic::Code::InvalidArgument, "version_id"),
            (GetAttachmentRequest { source: None, attachment_index: 0 }, tonic::Code::InvalidArgument, "source"),
        ];
        for (req, code, words) in cases {
            let err = c.get_attachment(req.clone()).await.expect_err("refused");
            assert_eq!(err.code(), code, "{req:?}: {}", err.message());
            assert!(err.message().contains(words), "{req:?}: {}", err.message());
        }
        // The size limit, through the Rust API the summary service uses in process.
        let counter = chartline::tokens::ModelTokenCounter::load(&tests::models_dir().join("gemma3-270m/gemma-3-270m-q4_k_m.gguf")).expect("tokenizer");
        let small = chartline_timeline::Timeline::new(chartline_store::Store::from_pool(pool.clone()), counter).with_max_attachment_bytes(200_000);
        let err = small.attachment("Media", FUNDUS_MEDIA, None, 0).await.expect_err("over the limit");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{}", status.message());
        assert!(status.message().contains("200000-byte attachment limit"), "{}", status.message());
        let ok = small.attachment("DocumentReference", CXR_DOC, Some(1), 0).await.expect("under the limit");
        assert_eq!(ok.data, png());
        // Over-limit images are listed, not attached: only the PNG (182 kB) fits 200 kB.
        let as_of = chrono::DateTime::from_timestamp(AS_OF, 0).expect("time");
        let p = small
            .build_prompt_with(PATIENT, "chart_summary", 200_000, as_of, chartline_timeline::PromptOptions { max_images: 4, image_tokens: 0 })
            .await
            .expect("prompt");
        assert_eq!(p.images.len(), 1);
        assert_eq!(p.images[0].source.id, CXR_DOC);
        assert!(p.text.contains("Fundus photograph, right eye (image/jpeg)"));
    }
}
