//! Shared helpers for Chartline's end-to-end tests: where the fixtures are, and how to
//! read them.

use std::path::{Path, PathBuf};

/// `../shared/fixtures` seen from the repository root (override with `CHARTLINE_FIXTURES`).
pub fn fixtures() -> PathBuf {
    if let Ok(p) = std::env::var("CHARTLINE_FIXTURES") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// The models folder (`CHARTLINE_MODELS_DIR`, default `<repo>/models`).
pub fn models_dir() -> PathBuf {
    match std::env::var("CHARTLINE_MODELS_DIR") {
        Ok(p) => PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"),
    }
}

/// The JSON files directly inside a fixture folder, sorted.
pub fn json_files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join(dir))
        .unwrap_or_else(|e| panic!("fixture folder {dir} must exist: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    v
}

/// The Synthea fixture Bundles in the order a real server takes them: the hospital and
/// practitioner `batch` Bundles first (conditional references resolve against them),
/// then the patients.
pub fn synthea_bundles() -> Vec<PathBuf> {
    let mut v = json_files("synthea/blaze-synthea-2.7.0");
    // `0-hospitalInformation…` sorts before `0-practitionerInformation…`, both before patients.
    v.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        (!name.starts_with("0-hospital"), !name.starts_with("0-practitioner"), name)
    });
    v.extend(json_files("synthea/smart-generated-sample-data-r4"));
    v
}

/// Reads a fixture as JSON.
pub fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Chartline's servers on ephemeral ports over a test database.
pub struct TestServer {
    /// The running servers.
    pub running: chartline::server::Running,
    /// `http://127.0.0.1:PORT/fhir`.
    pub fhir: String,
    /// `http://127.0.0.1:PORT` for gRPC clients.
    pub grpc: String,
    /// An HTTP client.
    pub http: reqwest::Client,
}

/// Starts the real servers (as `chartline serve` does) on `127.0.0.1:0`.
pub async fn start_server(pool: sqlx::PgPool, limits: chartline_fhir::Limits) -> TestServer {
    let store = chartline_store::Store::from_pool(pool);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
    let counter = chartline::tokens::ModelTokenCounter::load(&models_dir().join("gemma3-270m/gemma-3-270m-q4_k_m.gguf"))
        .expect("the embedded model's tokenizer (run scripts/install-models.sh)");
    let services = chartline::server::Services::without_model(store, limits, counter);
    let running = chartline::server::start(services, grpc, http).await.expect("servers start");
    TestServer {
        fhir: format!("http://{}/fhir", running.http_addr),
        grpc: format!("http://{}", running.grpc_addr),
        running,
        http: reqwest::Client::new(),
    }
}

/// The real servers with the embedded model loaded (waits until it is).
pub async fn start_server_with_model(pool: sqlx::PgPool, summary: chartline_cds::summary::SummaryConfig) -> TestServer {
    start_server_with_worker(pool, summary, None).await
}

/// The real servers with the model and, when given, a summary worker (jobs due at once).
pub async fn start_server_with_worker(
    pool: sqlx::PgPool,
    summary: chartline_cds::summary::SummaryConfig,
    worker: Option<chartline_cds::worker::WorkerConfig>,
) -> TestServer {
    start_server_serving(pool, summary, worker, models_dir().join("gemma3-270m/gemma-3-270m-q4_k_m.gguf")).await
}

/// The real servers with `model` (a GGUF file or a checkpoint folder) and, when given, a
/// summary worker.
pub async fn start_server_serving(
    pool: sqlx::PgPool,
    summary: chartline_cds::summary::SummaryConfig,
    worker: Option<chartline_cds::worker::WorkerConfig>,
    model: std::path::PathBuf,
) -> TestServer {
    let mut store = chartline_store::Store::from_pool(pool);
    if worker.is_some() {
        store = store.with_summary_debounce(chrono::Duration::zero());
    }
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
    let counter = chartline::tokens::ModelTokenCounter::load(&model).expect("the model's tokenizer (run scripts/install-models.sh)");
    let mut services = chartline::server::Services::without_model(store, chartline_fhir::Limits::default(), counter);
    services.models = Some(chartline::server::ModelPaths { model, embedding: Some(models_dir().join("all-minilm-l6-v2")), image_text: None });
    services.summary = summary;
    services.worker = worker;
    let running = chartline::server::start(services, grpc, http).await.expect("servers start");
    running.model_ready().await.expect("model loads");
    TestServer {
        fhir: format!("http://{}/fhir", running.http_addr),
        grpc: format!("http://{}", running.grpc_addr),
        running,
        http: reqwest::Client::new(),
    }
}

impl TestServer {
    /// The server's HTTP root (`http://127.0.0.1:PORT`).
    pub fn http_root(&self) -> String {
        format!("http://{}", self.running.http_addr)
    }

    /// POSTs a body to `/fhir{path}` and returns status and JSON.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.fhir))
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        (status, r.json().await.expect("FHIR JSON response"))
    }

    /// GETs `/fhir{path}`.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.http.get(format!("{}{path}", self.fhir)).send().await.expect("request sent");
        let status = r.status().as_u16();
        (status, r.json().await.expect("FHIR JSON response"))
    }

    /// Loads the Synthea fixtures in server order; panics on any failure.
    pub async fn load_synthea(&self, files: &[PathBuf]) {
        for f in files {
            let (status, body) = self.post("", std::fs::read(f).expect("fixture")).await;
            assert_eq!(status, 200, "{} must ingest: {body}", f.display());
            for e in body["entry"].as_array().into_iter().flatten() {
                let s = e["response"]["status"].as_str().unwrap_or("");
                assert!(s.starts_with("200") || s.starts_with("201"), "{}: entry failed: {e}", f.display());
            }
        }
    }
}

/// Row counts of the tables ingest writes, to prove a rejection stored nothing.
pub async fn table_counts(pool: &sqlx::PgPool) -> [i64; 4] {
    let mut out = [0; 4];
    for (i, t) in ["resource", "resource_history", "patient_event", "resource_identifier"].iter().enumerate() {
        out[i] = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {t}"))).fetch_one(pool).await.expect("count");
    }
    out
}
