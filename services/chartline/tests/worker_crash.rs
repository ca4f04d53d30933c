//! `kill -9` a worker in the middle of a summary job: the job is retaken after its lease
//! and exactly one output is stored. Runs the real `chartline` binary against PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chartline_ingest::{Ingestor, Source};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn serve(database_url: &str) -> Child {
    let models = std::env::var("CHARTLINE_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("models"));
    Command::new(env!("CARGO_BIN_EXE_chartline"))
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--job-lease-secs", "3"])
        .args(["--summary-token-budget", "1500", "--summary-max-tokens", "48", "--summary-debounce-ms", "0"])
        .arg("--model")
        .arg(models.join("gemma3-270m/gemma-3-270m-q4_k_m.gguf"))
        .arg("--embedding-model")
        .arg(models.join("none"))
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the chartline binary starts")
}

/// Waits for a `summary_job` notification starting with `prefix`.
async fn notified(listener: &mut PgListener, prefix: &str, within: Duration) -> String {
    tokio::time::timeout(within, async {
        loop {
            let n = listener.recv().await.expect("notification");
            if n.payload().starts_with(prefix) {
                return n.payload().to_owned();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no '{prefix}' notification within {within:?}"))
}

#[sqlx::test(migrator = "chartline_store::MIGRATOR")]
async fn a_worker_killed_mid_job_leaves_it_to_be_retaken_and_one_output_is_stored(pool: PgPool) {
    let fixtures = repo().join("../shared/fixtures/synthea/blaze-synthea-2.7.0");
    let ingestor = Ingestor::new(chartline_store::Store::from_pool(pool.clone()), chartline_fhir::Limits::default());
    let source = Source { sender: "test".into(), channel: "cli" };
    for f in ["0-hospitalInformation1625911868739.json", "0-practitionerInformation1625911868739.json", "098fc002-b87e-49dc-4b8e-8900a1bc8661.json"] {
        let bytes = std::fs::read(fixtures.join(f)).expect("fixture");
        ingestor.ingest_bundle(&bytes, &source).await.expect("ingest");
    }
    sqlx::query("update summary_job set not_before = now()").execute(&pool).await.expect("due now");

    let db = pool.connect_options().get_database().expect("test database").to_owned();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let url = format!("{}/{db}", base.rsplit_once('/').map_or(base.as_str(), |(b, _)| b));
    let mut listener = PgListener::connect_with(&pool).await.expect("listen");
    listener.listen("summary_job").await.expect("listen");

    let mut first = serve(&url);
    notified(&mut listener, "leased ", Duration::from_secs(120)).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");
    let outputs: i64 = sqlx::query_scalar("select count(*) from ai_output").fetch_one(&pool).await.expect("count");
    assert_eq!(outputs, 0, "killed before it could store anything");
    let (leased, attempts, last_error): (Option<String>, i32, Option<String>) =
        sqlx::query_as("select leased_by, attempts, last_error from summary_job").fetch_one(&pool).await.expect("job");
    assert!(leased.is_some(), "the dead worker's lease is still on the job");
    // The worker starts leasing only once its model is loaded: no attempt was spent failing
    // on a model that was still loading.
    assert_eq!((attempts, last_error), (1, None), "one attempt, and it had not failed");

    let mut second = serve(&url);
    notified(&mut listener, "stored ", Duration::from_secs(240)).await;
    let outputs: i64 = sqlx::query_scalar("select count(*) from ai_output").fetch_one(&pool).await.expect("count");
    let jobs: i64 = sqlx::query_scalar("select count(*) from summary_job").fetch_one(&pool).await.expect("count");
    second.kill().expect("stop");
    second.wait().expect("reaped");
    assert_eq!((outputs, jobs), (1, 0), "exactly one output, and the job is done");
    let requester: String = sqlx::query_scalar("select requester from provenance").fetch_one(&pool).await.expect("provenance");
    assert_eq!(requester, "summary-worker");
}
