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
    c.build_prompt(BuildPromptRequest { patient_id: patient.into(), task: "chart_summary".into(), token_budget: budget, as_of: Some(as_of()) })
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
