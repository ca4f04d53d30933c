//! Work ahead of the hook: ingest enqueues a summary job per changed patient, the worker
//! summarizes them all, and afterwards every fixture patient gets a card.

use std::collections::BTreeSet;
use std::time::Duration;

use chartline_cds::summary::SummaryConfig;
use chartline_cds::worker::WorkerConfig;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tests::{read_json, start_server_with_worker, synthea_bundles};

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn after_ingest_every_fixture_patient_gets_a_card(pool: PgPool) {
    let worker = WorkerConfig { worker_id: "test-worker".into(), lease: chrono::Duration::seconds(120), idle: Duration::from_millis(100) };
    let server = start_server_with_worker(pool.clone(), SummaryConfig { token_budget: 400, max_tokens: 8, ..SummaryConfig::default() }, Some(worker)).await;
    let mut listener = PgListener::connect_with(&pool).await.expect("listen");
    listener.listen("summary_job").await.expect("listen");

    let files = synthea_bundles();
    server.load_synthea(&files).await;
    let patients: BTreeSet<String> = files[2..]
        .iter()
        .map(|f| {
            let b = read_json(f);
            let e = b["entry"].as_array().expect("entries").iter().find(|e| e["resource"]["resourceType"] == "Patient").cloned().expect("patient");
            e["fullUrl"].as_str().and_then(|u| u.strip_prefix("urn:uuid:")).expect("urn").to_owned()
        })
        .collect();
    // The worker is already at it; every patient has a job or a summary.
    let queued: i64 = sqlx::query_scalar("select (select count(*) from summary_job) + (select count(*) from ai_output)")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(queued as usize, patients.len(), "one job per patient whose data changed");

    let mut done = BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(600), async {
        while done.len() < patients.len() {
            let n = listener.recv().await.expect("notification");
            if let Some(p) = n.payload().strip_prefix("stored ") {
                done.insert(p.to_owned());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {} patients summarized in time", done.len(), patients.len()));
    assert_eq!(done, patients);

    for p in &patients {
        let body = json!({"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                          "context": {"userId": "Practitioner/example", "patientId": p}});
        let t = std::time::Instant::now();
        let r = server.http.post(format!("{}/cds-services/chart-summary", server.http_root())).json(&body).send().await.expect("sent");
        let elapsed = t.elapsed();
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["cards"].as_array().map(Vec::len), Some(1), "{p} has a card");
        assert!(v["cards"][0]["detail"].as_str().is_some_and(|d| !d.contains("Newer data")), "{p}: the summary is current");
        // Not a timing assertion on the suite's speed: a card comes from storage, never the model.
        assert!(elapsed < Duration::from_secs(5), "{p}: card took {elapsed:?}");
    }
    let outputs: i64 = sqlx::query_scalar("select count(*) from ai_output").fetch_one(&pool).await.expect("count");
    assert_eq!(outputs as usize, patients.len(), "one summary per patient, no duplicates");
}
