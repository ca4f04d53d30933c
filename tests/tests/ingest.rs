//! Ingest end to end: the real servers over a fresh PostgreSQL database per test.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};

use chartline_fhir::Limits;
use serde_json::{Value, json};
use sqlx::PgPool;
use tests::{read_json, start_server, synthea_bundles, table_counts};

fn patient_bundle(id_prefix: &str) -> std::path::PathBuf {
    synthea_bundles()
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(id_prefix)))
        .expect("fixture patient exists")
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn every_synthea_bundle_ingests_and_type_counts_match_the_bundles(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let files = synthea_bundles();
    server.load_synthea(&files).await;

    // The id rule for creates: a urn:uuid fullUrl's UUID becomes the id when it is free or
    // already holds identical content (a re-send); otherwise the resource gets a new id.
    // The SMART patients share one Practitioner (same UUID, same content: stored once) and
    // carry older copies of three hospital Organizations (same UUID, other content: new ids).
    let mut by_id: std::collections::HashMap<(String, String), Value> = Default::default();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for f in &files {
        for e in read_json(f)["entry"].as_array().expect("entries") {
            let ty = e["resource"]["resourceType"].as_str().expect("type").to_owned();
            let key = (ty.clone(), e["fullUrl"].as_str().expect("fullUrl").to_owned());
            let mut content = e["resource"].clone();
            content.as_object_mut().expect("object").remove("id");
            match by_id.get(&key) {
                Some(c) if *c == content => continue,
                Some(_) => {}
                None => {
                    by_id.insert(key, content);
                }
            }
            *expected.entry(ty).or_default() += 1;
        }
    }
    assert_eq!(expected.values().sum::<i64>(), 16_493, "the fixture set as shipped");
    let rows: Vec<(String, i64)> =
        sqlx::query_as("select resource_type, count(*) from resource group by 1").fetch_all(&pool).await.expect("counts");
    let stored: BTreeMap<String, i64> = rows.into_iter().collect();
    assert_eq!(stored, expected, "every resource of every Bundle is stored once");

    let versions: i64 = sqlx::query_scalar("select count(*) from resource_history").fetch_one(&pool).await.expect("count");
    assert_eq!(versions, expected.values().sum::<i64>(), "one version each after a first load");
    drop(by_id);
    let events: i64 = sqlx::query_scalar("select count(*) from patient_event").fetch_one(&pool).await.expect("count");
    assert!(events > 10_000, "the timeline index is filled ({events} rows)");
    let log: Vec<(String, String)> =
        sqlx::query_as("select kind, outcome from ingest_log order by id").fetch_all(&pool).await.expect("log");
    assert_eq!(log.len(), files.len(), "one ingest log row per Bundle");
    assert_eq!(&log[0], &("batch".to_owned(), "stored".to_owned()));
    assert!(log[2..].iter().all(|(k, o)| k == "transaction" && o == "stored"));
    server.running.stop().await.expect("clean shutdown");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn everything_returns_every_resource_of_the_patient(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let files = synthea_bundles();
    let patient = patient_bundle("4b86befa");
    server.load_synthea(&[files[0].clone(), files[1].clone(), patient.clone()]).await;

    let (status, everything) = server.get("/Patient/4b86befa-fa7e-9285-615f-e081dab3f93c/$everything").await;
    assert_eq!(status, 200);
    let got: HashSet<(String, String)> = everything["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| (e["resource"]["resourceType"].as_str().unwrap_or("").to_owned(), e["resource"]["id"].as_str().unwrap_or("").to_owned()))
        .collect();
    let bundle = read_json(&patient);
    let entries = bundle["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 3177, "the largest fixture patient");
    for e in entries {
        let key = (e["resource"]["resourceType"].as_str().unwrap_or("").to_owned(), e["resource"]["id"].as_str().unwrap_or("").to_owned());
        assert!(got.contains(&key), "$everything is missing {key:?}");
    }
    // Conditional references were resolved to the practitioners and organizations loaded first.
    assert!(got.iter().any(|(t, _)| t == "Practitioner"), "referenced practitioners are included");
    let (_, enc) = server.get(&format!("/Encounter/{}", entries.iter().find(|e| e["resource"]["resourceType"] == "Encounter").expect("an encounter")["resource"]["id"].as_str().unwrap_or(""))).await;
    let practitioner_ref = enc["participant"][0]["individual"]["reference"].as_str().expect("resolved reference");
    assert!(practitioner_ref.starts_with("Practitioner/") && !practitioner_ref.contains('?'), "conditional reference rewritten: {practitioner_ref}");
    assert_eq!(enc["subject"]["reference"], "Patient/4b86befa-fa7e-9285-615f-e081dab3f93c", "urn:uuid rewritten to the assigned id");
    assert_eq!(enc["meta"]["versionId"], "1");

    let (status, _) = server.get("/Patient/no-such-patient/$everything").await;
    assert_eq!(status, 404, "unknown patient");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn resending_identical_content_creates_no_new_version_and_a_change_creates_one(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let files = synthea_bundles();
    let patient = patient_bundle("098fc002");
    server.load_synthea(&[files[0].clone(), files[1].clone(), patient.clone()]).await;
    let before = table_counts(&pool).await;

    let (status, resp) = server.post("", std::fs::read(&patient).expect("fixture")).await;
    assert_eq!(status, 200);
    assert!(resp["entry"].as_array().expect("entries").iter().all(|e| e["response"]["status"] == "200 OK"));
    assert_eq!(table_counts(&pool).await, before, "an identical re-send writes nothing");

    // PUT a changed Patient: version 2; PUT it again: still version 2.
    let (_, mut p) = server.get("/Patient/098fc002-b87e-49dc-4b8e-8900a1bc8661").await;
    p["gender"] = json!(if p["gender"] == "male" { "female" } else { "male" });
    let put = |body: Value| {
        let http = server.http.clone();
        let url = format!("{}/Patient/098fc002-b87e-49dc-4b8e-8900a1bc8661", server.fhir);
        async move {
            let r = http.put(url).header("content-type", "application/fhir+json").json(&body).send().await.expect("sent");
            (r.status().as_u16(), r.headers().get("etag").map(|v| v.to_str().unwrap_or("").to_owned()))
        }
    };
    assert_eq!(put(p.clone()).await, (200, Some("W/\"2\"".to_owned())));
    assert_eq!(put(p.clone()).await, (200, Some("W/\"2\"".to_owned())), "same content again: no version 3");
    let (status, history) = server.get("/Patient/098fc002-b87e-49dc-4b8e-8900a1bc8661/_history").await;
    assert_eq!(status, 200);
    assert_eq!(history["total"], 2);
    let (status, v1) = server.get("/Patient/098fc002-b87e-49dc-4b8e-8900a1bc8661/_history/1").await;
    assert_eq!(status, 200);
    assert_ne!(v1["gender"], p["gender"], "version 1 keeps the original content");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn a_transaction_failing_half_way_leaves_the_database_unchanged(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let files = synthea_bundles();
    server.load_synthea(&files[..2]).await;
    let before = table_counts(&pool).await;

    // The last entry references a urn that no entry carries: everything before it must go too.
    let mut bundle = read_json(&patient_bundle("098fc002"));
    let n = bundle["entry"].as_array().expect("entries").len();
    bundle["entry"][n - 1]["resource"]["target"] = json!([{"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"}]);
    let (status, oo) = server.post("", serde_json::to_vec(&bundle).expect("json")).await;
    assert_eq!(status, 400, "{oo}");
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(oo["issue"][0]["code"], "not-found");
    assert!(oo["issue"][0]["expression"][0].as_str().unwrap_or("").starts_with(&format!("Bundle.entry[{}]", n - 1)));
    assert_eq!(table_counts(&pool).await, before, "nothing of the failed transaction is stored");

    // A value PostgreSQL itself refuses (NUL in a string) is caught before the database.
    let mut bundle = read_json(&patient_bundle("098fc002"));
    bundle["entry"][n - 1]["resource"]["id"] = json!("x");
    bundle["entry"][3]["resource"]["status"] = json!("final\u{0}");
    let (status, oo) = server.post("", serde_json::to_vec(&bundle).expect("json")).await;
    assert_eq!(status, 400, "{oo}");
    assert_eq!(table_counts(&pool).await, before);
    let rejected: i64 = sqlx::query_scalar("select count(*) from ingest_log where outcome = 'rejected'").fetch_one(&pool).await.expect("count");
    assert_eq!(rejected, 2, "rejections are logged");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn concurrent_overlapping_bundles_lose_nothing_and_duplicate_nothing(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let files = synthea_bundles();
    server.load_synthea(&files[..2]).await;
    let patients: Vec<_> = files[2..6].to_vec();
    let mut tasks = Vec::new();
    for k in 0..4 {
        let mut order = patients.clone();
        order.rotate_left(k);
        let (http, url) = (server.http.clone(), server.fhir.clone());
        tasks.push(tokio::spawn(async move {
            for f in order {
                let r = http.post(&url).header("content-type", "application/fhir+json").body(std::fs::read(&f).expect("fixture")).send().await.expect("sent");
                assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let expected: i64 = patients.iter().map(|f| read_json(f)["entry"].as_array().map_or(0, Vec::len) as i64).sum::<i64>() + 388 + 390;
    let resources: i64 = sqlx::query_scalar("select count(*) from resource").fetch_one(&pool).await.expect("count");
    let versions: i64 = sqlx::query_scalar("select count(*) from resource_history").fetch_one(&pool).await.expect("count");
    assert_eq!(resources, expected, "no resource lost or duplicated");
    assert_eq!(versions, expected, "identical concurrent sends make no extra versions");
    let dup_events: i64 = sqlx::query_scalar(
        "select count(*) from (select resource_type, resource_id, component from patient_event group by 1, 2, 3 having count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(dup_events, 0, "the timeline index holds each fact once");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn bad_input_gets_a_clear_operation_outcome_and_stores_nothing(pool: PgPool) {
    let limits = Limits { max_bytes: 2 * 1024 * 1024, max_depth: 32, ..Limits::default() };
    let server = start_server(pool.clone(), limits).await;
    let files = synthea_bundles();
    server.load_synthea(&files[..2]).await;
    let before = table_counts(&pool).await;
    let deep = format!("{{\"resourceType\":\"Patient\",\"extension\":{}{}}}", "[{\"extension\":".repeat(40), "[]}]".repeat(40));
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", "/Patient", b"{\"resourceType\": \"Patient\",".to_vec(), 400, "invalid"),
        ("missing resourceType", "/Patient", br#"{"id": "a"}"#.to_vec(), 400, "required"),
        ("unknown resourceType", "", br#"{"resourceType": "Patientt"}"#.to_vec(), 400, "invalid"),
        ("invalid id", "/Patient", br#"{"resourceType": "Patient", "id": "bad_id!"}"#.to_vec(), 400, "invalid"),
        ("invalid date", "/Patient", br#"{"resourceType": "Patient", "birthDate": "1999-02-30x"}"#.to_vec(), 400, "invalid"),
        ("invalid base64", "/Binary", br#"{"resourceType": "Binary", "contentType": "text/plain", "data": "%%%"}"#.to_vec(), 400, "invalid"),
        ("array where an object belongs", "/Patient", br#"{"resourceType": "Patient", "maritalStatus": [{"text": "x"}]}"#.to_vec(), 400, "invalid"),
        ("object where an array belongs", "/Patient", br#"{"resourceType": "Patient", "name": {"family": "x"}}"#.to_vec(), 400, "invalid"),
        ("unknown element", "/Patient", br#"{"resourceType": "Patient", "favouriteColour": "blue"}"#.to_vec(), 400, "structure"),
        ("nesting too deep", "/Patient", deep.into_bytes(), 400, "too-costly"),
        ("payload too large", "/Patient", format!("{{\"resourceType\":\"Patient\",\"id\":\"{}\"}}", "a".repeat(3 * 1024 * 1024)).into_bytes(), 413, "too-long"),
        ("type differs from URL", "/Observation", br#"{"resourceType": "Patient"}"#.to_vec(), 400, "invalid"),
        ("a Bundle that is not a transaction or batch", "", br#"{"resourceType": "Bundle", "type": "collection"}"#.to_vec(), 422, "not-supported"),
        ("a transaction with a reference to nothing", "", serde_json::to_vec(&json!({
            "resourceType": "Bundle", "type": "transaction", "entry": [{
                "fullUrl": "urn:uuid:8f5b1c1e-1b0a-4c4f-9a55-000000000001",
                "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/does-not-exist"}},
                "request": {"method": "POST", "url": "Observation"}}]})).expect("json"), 400, "not-found"),
        ("a conditional reference matching several resources", "", serde_json::to_vec(&json!({
            "resourceType": "Bundle", "type": "transaction", "entry": [{
                "fullUrl": "urn:uuid:8f5b1c1e-1b0a-4c4f-9a55-000000000002",
                "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                             "performer": [{"reference": "Organization?identifier=https://github.com/synthetichealth/synthea|"}]},
                "request": {"method": "POST", "url": "Observation"}}]})).expect("json"), 400, "not-found"),
    ];
    for (what, path, body, status, code) in cases {
        let (got, oo) = server.post(path, body).await;
        assert_eq!(got, status, "{what}: HTTP status; outcome {oo}");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{what}");
        assert_eq!(oo["issue"][0]["code"], code, "{what}: issue code; outcome {oo}");
        assert!(oo["issue"][0]["diagnostics"].as_str().is_some_and(|d| !d.is_empty()), "{what}: says why");
    }
    assert_eq!(table_counts(&pool).await, before, "no bad input stored anything");

    // Two stored Organizations with one identifier: a conditional reference to it is ambiguous.
    for id in ["org-a", "org-b"] {
        let body = json!({"resourceType": "Organization", "id": id, "identifier": [{"system": "urn:test", "value": "dup"}]});
        let r = server.http.put(format!("{}/Organization/{id}", server.fhir)).json(&body).send().await.expect("sent");
        assert_eq!(r.status().as_u16(), 201);
    }
    let ambiguous = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": "urn:uuid:8f5b1c1e-1b0a-4c4f-9a55-000000000003",
        "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                     "performer": [{"reference": "Organization?identifier=urn:test|dup"}]},
        "request": {"method": "POST", "url": "Observation"}}]});
    let (status, oo) = server.post("", serde_json::to_vec(&ambiguous).expect("json")).await;
    assert_eq!(status, 412, "{oo}");
    assert_eq!(oo["issue"][0]["code"], "multiple-matches");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn reads_answer_with_versions_and_clear_errors(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let body = json!({"resourceType": "Patient", "gender": "female", "birthDate": "1970"});
    let r = server.http.post(format!("{}/Patient", server.fhir)).json(&body).send().await.expect("sent");
    assert_eq!(r.status().as_u16(), 201);
    let location = r.headers().get("location").and_then(|v| v.to_str().ok()).expect("Location header").to_owned();
    let created: Value = r.json().await.expect("json");
    let id = created["id"].as_str().expect("assigned id");
    assert_eq!(location, format!("/fhir/Patient/{id}/_history/1"));
    assert_eq!(created["meta"]["versionId"], "1");
    let (status, _) = server.get(&format!("/Patient/{id}/_history/7")).await;
    assert_eq!(status, 404);
    let (status, oo) = server.get("/Patient/bad_id!").await;
    assert_eq!((status, oo["issue"][0]["code"].as_str()), (400, Some("invalid")));
    let (status, _) = server.get("/NotAType/1").await;
    assert_eq!(status, 404);
    let (status, cs) = server.get("/metadata").await;
    assert_eq!(status, 200);
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert!(cs["rest"][0]["interaction"].as_array().expect("interactions").iter().any(|i| i["code"] == "transaction"));
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn ndjson_import_stores_good_lines_and_reports_bad_ones_by_line(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let files = synthea_bundles();
    let patient = patient_bundle("4b86befa");
    server.load_synthea(&[files[0].clone(), files[1].clone(), patient]).await;
    let (_, everything) = server.get("/Patient/4b86befa-fa7e-9285-615f-e081dab3f93c/$everything").await;
    let mut lines: Vec<String> = everything["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| serde_json::to_string(&e["resource"]).expect("json"))
        .collect();
    let total = lines.len();
    lines.insert(10, "{\"resourceType\": \"Patient\", \"id\": \"broken\"".to_owned());
    let mut changed: Value = serde_json::from_str(&lines[5]).expect("json");
    changed["meta"]["tag"] = json!([{"system": "urn:test", "code": "reimported"}]);
    lines[5] = serde_json::to_string(&changed).expect("json");
    let ndjson = lines.join("\n") + "\n";
    assert!(ndjson.len() > 3_000_000, "several MB of NDJSON");

    let r = server.http.post(format!("{}/$import", server.fhir)).header("content-type", "application/fhir+ndjson").body(ndjson).send().await.expect("sent");
    assert_eq!(r.status().as_u16(), 200);
    let oo: Value = r.json().await.expect("json");
    let summary = oo["issue"][0]["diagnostics"].as_str().expect("summary");
    assert_eq!(summary, format!("created 0, updated 1, unchanged {}, rejected 1", total - 1), "{oo}");
    assert_eq!(oo["issue"][1]["expression"][0], "line 11");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn grpc_ingest_streams_ndjson_and_returns_operation_outcomes_in_status_details(pool: PgPool) {
    use chartline_proto::v1::ingest_service_client::IngestServiceClient;
    use chartline_proto::v1::{IngestBundleRequest, NdjsonChunk, Source};

    let server = start_server(pool.clone(), Limits::default()).await;
    let mut client = IngestServiceClient::connect(server.grpc.clone()).await.expect("connect");

    // A bad Bundle: INVALID_ARGUMENT with the OperationOutcome JSON in the details.
    let err = client
        .ingest_bundle(IngestBundleRequest { bundle_json: b"{\"resourceType\": \"Bundle\", \"type\": \"transaction\", \"entry\": [{}]}".to_vec().into(), source: None })
        .await
        .expect_err("must be rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let oo: Value = serde_json::from_slice(err.details()).expect("OperationOutcome in details");
    assert_eq!(oo["resourceType"], "OperationOutcome");

    // The hospital batch Bundle over gRPC, then NDJSON in chunks that split lines.
    let files = synthea_bundles();
    let resp = client
        .ingest_bundle(IngestBundleRequest { bundle_json: std::fs::read(&files[0]).expect("fixture").into(), source: Some(Source { sender: "ehr-test".into() }) })
        .await
        .expect("batch ingests")
        .into_inner();
    assert_eq!(resp.counts.expect("counts").created, 388);
    let lines: Vec<String> = (0..50)
        .map(|i| json!({"resourceType": "Patient", "id": format!("nd-{i}"), "gender": "unknown"}).to_string())
        .chain(std::iter::once("not json".to_owned()))
        .collect();
    let data = lines.join("\n").into_bytes();
    let chunks: Vec<NdjsonChunk> = data
        .chunks(37)
        .enumerate()
        .map(|(i, c)| NdjsonChunk { data: c.to_vec().into(), source: (i == 0).then(|| Source { sender: "ehr-test".into() }) })
        .collect();
    let resp = client.ingest_ndjson(futures::stream::iter(chunks)).await.expect("ndjson").into_inner();
    let counts = resp.counts.expect("counts");
    assert_eq!((counts.created, counts.rejected), (50, 1));
    assert_eq!(resp.errors[0].line, 51);
    let sender: String = sqlx::query_scalar("select sender from ingest_log where kind = 'ndjson'").fetch_one(&pool).await.expect("log row");
    assert_eq!(sender, "ehr-test");

    // Health and reflection answer.
    let channel = tonic::transport::Channel::from_shared(server.grpc.clone()).expect("uri").connect().await.expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "chartline.v1.IngestService".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(status.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn a_batch_stores_its_good_entries_and_reports_each_bad_one(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "b1", "gender": "female"}, "request": {"method": "PUT", "url": "Patient/b1"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/b1"},
                      "performer": [{"reference": "Practitioner?identifier=urn:none|0"}]},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Patient", "id": "b2"}, "request": {"method": "PUT", "url": "Patient/b3"}},
        {"resource": {"resourceType": "Patient", "id": "b4", "gender": "male"}, "request": {"method": "PUT", "url": "Patient/b4"}}
    ]});
    let (status, resp) = server.post("", serde_json::to_vec(&batch).expect("json")).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["type"], "batch-response");
    let statuses: Vec<&str> = resp["entry"].as_array().expect("entries").iter().map(|e| e["response"]["status"].as_str().unwrap_or("")).collect();
    assert_eq!(statuses, ["201 Created", "400 Bad Request", "400 Bad Request", "201 Created"]);
    assert_eq!(resp["entry"][1]["response"]["outcome"]["issue"][0]["code"], "not-found", "the conditional reference matched nothing");
    let stored: Vec<String> = sqlx::query_scalar("select id from resource order by id").fetch_all(&pool).await.expect("ids");
    assert_eq!(stored, ["b1", "b4"], "only the good entries are stored");
    let log: (String, i32, i32) = sqlx::query_as("select outcome, created, rejected from ingest_log where kind = 'batch'").fetch_one(&pool).await.expect("log");
    assert_eq!(log, ("partial".to_owned(), 2, 2));
    let jobs: Vec<String> = sqlx::query_scalar("select patient_id from summary_job order by 1").fetch_all(&pool).await.expect("jobs");
    assert_eq!(jobs, ["b1", "b4"], "changed patients get a summary job in the same transaction");
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn a_batch_in_one_pass_ends_as_entry_by_entry_would(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let org = |n: &str| {
        json!({"resource": {"resourceType": "Organization", "identifier": [{"system": "urn:t", "value": n}], "name": format!("Org {n}")},
               "request": {"method": "POST", "url": "Organization", "ifNoneExist": format!("identifier=urn:t|{n}")}})
    };
    let statuses = |resp: &Value| -> Vec<String> {
        resp["entry"].as_array().expect("entries").iter().map(|e| e["response"]["status"].as_str().unwrap_or("").to_owned()).collect()
    };
    let orgs = |n: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("select count(*) from resource_identifier where resource_type = 'Organization' and value = $1")
                .bind(n)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
    };

    // Independent entries, then the same again: created, then found by their conditions.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [org("1"), org("2"), org("3")]});
    let (status, resp) = server.post("", serde_json::to_vec(&batch).expect("json")).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(statuses(&resp), ["201 Created"; 3]);
    let (_, resp) = server.post("", serde_json::to_vec(&batch).expect("json")).await;
    assert_eq!(statuses(&resp), ["200 OK"; 3], "{resp}");
    assert_eq!((orgs("1").await, orgs("2").await, orgs("3").await), (1, 1, 1));

    // A conditional create that an earlier entry of the same batch satisfies: entry by
    // entry, it finds that entry's resource instead of making a second one.
    let mut plain = org("9");
    plain["request"] = json!({"method": "POST", "url": "Organization"});
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [plain, org("9")]});
    let (_, resp) = server.post("", serde_json::to_vec(&batch).expect("json")).await;
    assert_eq!(statuses(&resp), ["201 Created", "200 OK"], "{resp}");
    assert_eq!(orgs("9").await, 1);

    // Every entry well-formed, one failing when applied: the others are still stored.
    let bad = json!({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                  "performer": [{"reference": "Practitioner?identifier=urn:none|0"}]},
                     "request": {"method": "POST", "url": "Observation"}});
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [org("4"), bad, org("5")]});
    let (status, resp) = server.post("", serde_json::to_vec(&batch).expect("json")).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(statuses(&resp), ["201 Created", "400 Bad Request", "201 Created"]);
    assert_eq!((orgs("4").await, orgs("5").await), (1, 1));
    let observations: i64 = sqlx::query_scalar("select count(*) from resource where resource_type = 'Observation'").fetch_one(&pool).await.expect("count");
    assert_eq!(observations, 0);
    let log: (String, i32, i32) = sqlx::query_as("select outcome, created, rejected from ingest_log where kind = 'batch' order by id desc limit 1")
        .fetch_one(&pool)
        .await
        .expect("log");
    assert_eq!(log, ("partial".to_owned(), 2, 1));
}

/// Every stored value reads back as exactly what ingest derived from the stored version:
/// the content text and its hash, the compartment, the identifiers and the timeline rows
/// (times before and after 2000, fractional values, nulls, non-ASCII text).
#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn stored_rows_read_back_exactly_as_derived_from_each_stored_version(pool: PgPool) {
    let server = start_server(pool.clone(), Limits::default()).await;
    let files: Vec<_> = synthea_bundles().into_iter().take(5).collect();
    server.load_synthea(&files).await;

    type Row = (String, String, i64, Option<String>, Option<String>, Vec<u8>);
    let versions: Vec<Row> = sqlx::query_as(
        "select h.resource_type, h.id, h.version_id, h.patient_id, h.content, h.sha256
         from resource_history h join resource r using (resource_type, id, version_id) order by 1, 2",
    )
    .fetch_all(&pool)
    .await
    .expect("versions");
    assert!(versions.len() > 1_000, "five Bundles store many versions ({})", versions.len());
    // All timeline and identifier rows, grouped by the version they index.
    type Key = (String, String, i64);
    type Event = (i32, String, Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<String>, Option<String>, Option<String>, Option<String>);
    type Values = (Option<f64>, Option<String>, Option<String>, Option<f64>, Option<f64>, Option<String>, Option<String>, Option<String>);
    let mut events: HashMap<Key, Vec<(Event, Values)>> = HashMap::new();
    // (A row type holds at most 16 columns: three reads of the same ordered rows.)
    let heads: Vec<(String, String, i64)> = event_columns(&pool, "resource_type, resource_id, version_id").await;
    let firsts: Vec<Event> =
        event_columns(&pool, "component, kind, event_time, end_time, category, code_system, code, display").await;
    let seconds: Vec<Values> =
        event_columns(&pool, "value_num, value_text, unit, ref_low, ref_high, interpretation, status, patient_id").await;
    for ((h, e), v) in heads.into_iter().zip(firsts).zip(seconds) {
        events.entry((h.0, h.1, h.2)).or_default().push((e, v));
    }
    let mut identifiers: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
    let rows: Vec<(String, String, String, String)> =
        sqlx::query_as("select resource_type, id, system, value from resource_identifier").fetch_all(&pool).await.expect("identifiers");
    for (t, i, s, v) in rows {
        identifiers.entry((t, i)).or_default().push((s, v));
    }

    let (mut events_checked, mut identifiers_checked, mut before_2000) = (0, 0, 0);
    for (ty, id, version, patient, content, sha) in &versions {
        let content: Value = serde_json::from_str(content.as_deref().expect("current versions have content")).expect("JSON text");
        assert_eq!(content["id"], json!(id));
        assert_eq!(content["meta"]["versionId"], json!(version.to_string()));
        let tree = chartline_fhir::Json::from(&content);
        assert_eq!(sha.as_slice(), chartline_fhir::content_sha256(&tree).as_slice(), "{ty}/{id}: hash of the stored text");
        assert_eq!(patient.as_deref(), chartline_fhir::patient_of(&tree).as_deref(), "{ty}/{id}: compartment");

        let stored = events.remove(&(ty.clone(), id.clone(), *version)).unwrap_or_default();
        let micros = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros());
        let expected = if patient.is_some() { chartline_fhir::extract_events(&tree) } else { Vec::new() };
        assert_eq!(stored.len(), expected.len(), "{ty}/{id}: one row per derived event");
        for ((row, value), e) in stored.iter().zip(&expected) {
            assert_eq!(row.0, e.component);
            assert_eq!(row.1, e.kind);
            assert_eq!(micros(row.2), micros(e.time), "{ty}/{id}: event_time");
            assert_eq!(micros(row.3), micros(e.end_time), "{ty}/{id}: end_time");
            assert_eq!((&row.4, &row.5, &row.6, &row.7), (&e.category, &e.code_system, &e.code, &e.display));
            assert_eq!(value.0.map(f64::to_bits), e.value_num.map(f64::to_bits), "{ty}/{id}: value_num bit for bit");
            assert_eq!((&value.1, &value.2), (&e.value_text, &e.unit));
            assert_eq!(value.3.map(f64::to_bits), e.ref_low.map(f64::to_bits));
            assert_eq!(value.4.map(f64::to_bits), e.ref_high.map(f64::to_bits));
            assert_eq!((&value.5, &value.6), (&e.interpretation, &e.status));
            assert_eq!(value.7.as_deref(), patient.as_deref());
            if e.time.is_some_and(|t| t.timestamp() < 946_684_800) {
                before_2000 += 1;
            }
            events_checked += 1;
        }

        let mut stored = identifiers.remove(&(ty.clone(), id.clone())).unwrap_or_default();
        let mut want: Vec<(String, String)> = content["identifier"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| Some((i["system"].as_str().unwrap_or("").to_owned(), i["value"].as_str()?.to_owned())))
            .collect();
        stored.sort();
        want.sort();
        assert_eq!(stored, want, "{ty}/{id}: identifiers");
        identifiers_checked += stored.len();
    }
    assert!(events.is_empty() && identifiers.is_empty(), "no rows index anything but a current version");
    assert!(events_checked > 1_000 && identifiers_checked > 100, "{events_checked} events, {identifiers_checked} identifiers");
    assert!(before_2000 > 0, "some events predate PostgreSQL's epoch (2000-01-01)");
}

/// `columns` of every patient_event row, in one fixed order.
async fn event_columns<T>(pool: &PgPool, columns: &str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let sql = format!("select {columns} from patient_event order by resource_type, resource_id, version_id, component");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await.expect("patient_event rows")
}
