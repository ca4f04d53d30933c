//! `chartline bench-prompt`: BuildPrompt latency for one patient (p50/p99), measured in the
//! same run against the floor of one indexed SELECT of that patient's events.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use chartline_ingest::{Ingestor, Source};
use chartline_timeline::Timeline;
use chrono::Utc;

use crate::config::BenchPromptArgs;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Loads the fixtures if the patient is missing, then measures.
pub async fn run(args: BenchPromptArgs) -> anyhow::Result<ExitCode> {
    let store = crate::server::open_store(&args.db).await?;
    if store.read("Patient", &args.patient).await?.is_none() {
        let ingestor = Ingestor::new(store.clone(), chartline_fhir::Limits::default());
        let source = Source { sender: "bench".into(), channel: "cli" };
        for f in crate::ingest_cli::collect_files(std::slice::from_ref(&args.fixtures))? {
            crate::ingest_cli::ingest_file(&ingestor, &f, &source).await?;
        }
    }
    let counter = crate::tokens::ModelTokenCounter::load(&args.model)?;
    let timeline = Timeline::new(store.clone(), counter);
    let as_of = Utc::now();
    let events = store.patient_events_floor(&args.patient).await?;
    // Warm both paths (connections, caches) before measuring.
    for _ in 0..3 {
        store.patient_events_floor(&args.patient).await?;
        timeline.build_prompt(&args.patient, "chart_summary", args.budget, as_of).await?;
    }
    let (mut floor, mut build) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for _ in 0..args.iterations {
        let t = Instant::now();
        store.patient_events_floor(&args.patient).await?;
        floor.push(t.elapsed());
        let t = Instant::now();
        let p = timeline.build_prompt(&args.patient, "chart_summary", args.budget, as_of).await?;
        build.push(t.elapsed());
        tokens = p.token_count;
    }
    floor.sort();
    build.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("patient {} ({events} timeline rows), budget {}, {tokens} prompt tokens, {} iterations", args.patient, args.budget, args.iterations);
    println!("| measure | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    println!("| floor: one indexed SELECT of the patient's events | {:.1} | {:.1} |", ms(percentile(&floor, 0.5)), ms(percentile(&floor, 0.99)));
    println!("| BuildPrompt (in process) | {:.1} | {:.1} |", ms(percentile(&build, 0.5)), ms(percentile(&build, 0.99)));
    println!("\np99 ratio BuildPrompt / floor = {:.2}", ms(percentile(&build, 0.99)) / ms(percentile(&floor, 0.99)));
    Ok(ExitCode::SUCCESS)
}
