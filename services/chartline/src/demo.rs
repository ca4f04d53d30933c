//! `chartline demo`: the whole path on one machine. Starts every service in this process,
//! sends the shipped Synthea Bundles over FHIR REST as an EHR would, summarizes one patient
//! with the embedded model over gRPC, and prints the summary with its citations and
//! provenance, then verifies the provenance chain.

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
    let counter = crate::tokens::ModelTokenCounter::load(&args.model)?;
    let mut services = crate::server::Services::without_model(store, chartline_fhir::Limits::default(), counter);
    services.models = Some(crate::server::ModelPaths { model: args.model.clone(), embedding: None, image_text: None });
    services.summary = chartline_cds::summary::SummaryConfig { token_budget: args.token_budget, max_tokens: args.max_tokens, ..Default::default() };
    let running = crate::server::start(services, TcpListener::bind("127.0.0.1:0").await?, TcpListener::bind("127.0.0.1:0").await?).await?;
    let base = format!("http://{}/fhir", running.http_addr);
    println!("Chartline serving FHIR REST at {base} and gRPC at {}", running.grpc_addr);

    let files = crate::ingest_cli::collect_files(std::slice::from_ref(&args.fixtures))?;
    if files.is_empty() {
        bail!("no fixture Bundles in {}", args.fixtures.display());
    }
    let client = reqwest::Client::new();
    let started = Instant::now();
    let (mut created, mut unchanged, mut failed) = (0, 0, 0);
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
                s if s.starts_with("200") => unchanged += 1,
                _ => failed += 1,
            }
        }
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
    running.model_ready().await?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", running.grpc_addr))?.connect().await?;
    let mut summaries = chartline_proto::v1::summary_service_client::SummaryServiceClient::new(channel.clone());
    println!("\nSummarizing Patient/{} with the embedded model ...", args.patient);
    let t = Instant::now();
    let s = summaries
        .summarize(chartline_proto::v1::SummarizeRequest { patient_id: args.patient.clone(), requester: "chartline-demo".into() })
        .await
        .context("Summarize")?
        .into_inner();
    let p = s.provenance.clone().unwrap_or_default();
    let m = p.model.clone().unwrap_or_default();
    println!("done in {:.1} s\n", t.elapsed().as_secs_f64());
    println!("== AI summary (preliminary; {} of {} statements carry a verified source) ==", s.statements.iter().filter(|x| x.supported).count(), s.statements.len());
    println!("{}\n", s.narrative.trim());
    for st in &s.statements {
        let mark = if st.supported { "verified " } else { "UNSUPPORTED" };
        println!("  [{mark}] {}", st.text.chars().take(110).collect::<String>());
    }
    println!("\n== Structured sections (from the chart, not the model) ==");
    for sec in &s.sections {
        println!("{}", sec.text);
    }
    println!("\n== Provenance ==");
    println!("output          {}", s.output_id);
    println!("model           {} ({}), weights sha256 {}", m.name, m.backend, m.weights_sha256);
    println!("tokenizer       sha256 {}", m.tokenizer_sha256);
    println!("prompt          template {}, sha256 {}, {} input resource versions", p.template_version, p.prompt_sha256, p.inputs.len());
    println!("parameters      {}", p.parameters_json);
    println!("citations       {} found, {} verified, {} unsupported statements", s.citations_found, s.citations_verified, s.unsupported_statements);
    println!("chain           position {}, row hash {}, previous {}", p.chain_seq, p.row_hash, p.prev_hash);
    println!("FHIR            GET {base}/Composition/{}  ·  GET {base}/Provenance?target=Composition/{}", s.output_id, s.output_id);
    let mut audit = chartline_proto::v1::audit_service_client::AuditServiceClient::new(channel);
    let v = audit.verify_chain(chartline_proto::v1::VerifyChainRequest {}).await?.into_inner();
    if v.ok {
        println!("VerifyChain     ok ({} rows)", v.rows_checked);
    } else {
        println!("VerifyChain     BROKEN at row {}: {}", v.first_broken_seq, v.reason);
    }
    running.stop().await?;
    Ok(if failed > 0 || !v.ok { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
