//! `chartline bench-ingest`: ingest throughput over the FHIR REST face, measured in the same
//! run against the floor of a bare `COPY` of the same resources' JSON into a jsonb column.
//! Run it against an empty database (scripts/bench-ingest.sh makes one).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::config::BenchIngestArgs;

/// Runs the benchmark and prints a Markdown table.
pub async fn run(args: BenchIngestArgs) -> anyhow::Result<ExitCode> {
    let store = crate::server::open_store(&args.db).await?;
    let files = crate::ingest_cli::collect_files(std::slice::from_ref(&args.fixtures))?;
    let mut bodies = Vec::with_capacity(files.len());
    let mut docs = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let v: Value = serde_json::from_slice(&bytes)?;
        for e in v["entry"].as_array().into_iter().flatten() {
            docs.push(serde_json::to_string(&e["resource"])?);
        }
        // Cheap to clone for each send: the clients' copying is not what is measured.
        bodies.push(bytes::Bytes::from(bytes));
    }
    let resources = docs.len();
    let mb: f64 = bodies.iter().map(|b| b.len()).sum::<usize>() as f64 / 1e6;

    // Validation alone, in this process, on one thread: the CPU floor of the Rust side.
    let limits = chartline_fhir::Limits::default();
    let one_thread = chartline_fhir::Limits { validation_threads: 1, ..limits };
    let t = Instant::now();
    for b in &bodies {
        let v = chartline_fhir::parse_json(b, &one_thread).map_err(|e| anyhow::anyhow!("{e}"))?;
        chartline_fhir::validate_resource(&v, &one_thread).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let validate_s = t.elapsed().as_secs_f64();

    let running = crate::server::start(
        crate::server::Services::without_model(store.clone(), limits, crate::tokens::ModelTokenCounter::load(&args.model)?),
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    let url = format!("http://{}/fhir", running.http_addr);
    let client = reqwest::Client::new();
    let post = |body: bytes::Bytes| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.post(url).header("content-type", "application/fhir+json").body(body).send().await?;
            anyhow::ensure!(r.status().is_success(), "HTTP {}", r.status());
            Ok::<_, anyhow::Error>(())
        }
    };
    // Batch Bundles first (their conditional references are what patients resolve against).
    let (first, patients) = bodies.split_at(2.min(bodies.len()));
    let batch_resources: usize = first.iter().map(|b| serde_json::from_slice::<Value>(b).map(|v| v["entry"].as_array().map_or(0, Vec::len)).unwrap_or(0)).sum();
    let clients = args.clients.max(1);
    let mut runs = Vec::new();
    for run in 0..args.runs.max(1) {
        if run > 0 {
            store.reset_benchmark_database().await?;
        }
        let t = Instant::now();
        let copied = store.copy_jsonb_floor(&docs).await?;
        let copy_s = t.elapsed().as_secs_f64();
        anyhow::ensure!(copied as usize == resources, "COPY stored {copied} of {resources} documents");

        let cpu_before = Cpu::now();
        let t = Instant::now();
        for b in first {
            post(b.clone()).await?;
        }
        let batch_s = t.elapsed().as_secs_f64();
        // Each client sends its next Bundle as soon as its previous one is answered, as an
        // EHR pushing a backlog would.
        let mut sent = futures::stream::iter(patients.iter().cloned().map(&post)).buffer_unordered(clients);
        while let Some(r) = sent.next().await {
            r?;
        }
        let rest_s = t.elapsed().as_secs_f64();
        let cpu = Cpu::now().since(&cpu_before);
        let stored = store.count_current_resources().await?;
        anyhow::ensure!(stored as usize == resources, "Chartline stored {stored} of {resources} resources");
        runs.push(Run { copy_s, rest_s, batch_s, cpu });
    }
    running.stop().await?;

    let median_of = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect()).unwrap_or(f64::NAN);
    let (copy_s, rest_s, batch_s) = (median_of(|r| r.copy_s), median_of(|r| r.rest_s), median_of(|r| r.batch_s));
    let floor = resources as f64 / copy_s;
    let rest = resources as f64 / rest_s;
    println!("{} runs; seconds per run: floor {}; Chartline {}\n", runs.len(), list(runs.iter().map(|r| r.copy_s)), list(runs.iter().map(|r| r.rest_s)));
    println!("| measure (median of {} runs) | seconds | resources/s | MB/s |", runs.len());
    println!("|---|---:|---:|---:|");
    println!("| floor: COPY of the {resources} resources' JSON into one jsonb column | {copy_s:.2} | {floor:.0} | {:.1} |", mb / copy_s);
    println!("| Chartline: {} Bundles over FHIR REST, {clients} concurrent client(s) | {rest_s:.2} | {rest:.0} | {:.1} |", files.len(), mb / rest_s);
    println!(
        "| of which the 2 batch Bundles ({batch_resources} resources, one client) | {batch_s:.2} | {:.0} | |",
        batch_resources as f64 / batch_s
    );
    println!(
        "| of which the {} transaction Bundles | {:.2} | {:.0} | |",
        files.len().saturating_sub(2),
        rest_s - batch_s,
        (resources - batch_resources) as f64 / (rest_s - batch_s)
    );
    println!("| (parse + validate alone, in process, one thread, no database) | {validate_s:.2} | {:.0} | {:.1} |", resources as f64 / validate_s, mb / validate_s);
    let cpu_median = |f: fn(&CpuSpent) -> f64| median(runs.iter().map(|r| r.cpu.as_ref().map(f)).collect::<Option<_>>()?);
    if let (Some(own), Some(pg)) = (cpu_median(|c| c.own_s), cpu_median(|c| c.postgres_s)) {
        println!(
            "\nCPU during the Chartline part (median): this process {own:.2} s (server and the benchmark's HTTP clients), \
             PostgreSQL {pg:.2} s (all its processes), for {rest_s:.2} s of wall time on {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    println!("\nratio Chartline / floor = {:.2}", rest / floor);
    // Each run measures the floor and Chartline back to back, so the ratio within a run is
    // less exposed to a VM whose speed drifts between minutes than the ratio of medians.
    let per_run: Vec<f64> = runs.iter().map(|r| r.copy_s / r.rest_s).collect();
    println!(
        "per-run ratios (floor and Chartline back to back): {} (median {:.2})",
        list(per_run.iter().copied()),
        median(per_run.clone()).unwrap_or(f64::NAN)
    );
    Ok(ExitCode::SUCCESS)
}

struct Run {
    copy_s: f64,
    rest_s: f64,
    batch_s: f64,
    cpu: Option<CpuSpent>,
}

/// The middle value (the upper one of an even count); None for no values.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// CPU time used so far by this process and by PostgreSQL's processes on this machine
/// (Linux `/proc`; None elsewhere, or when the server runs on another machine).
struct Cpu(Option<(u64, u64)>);

struct CpuSpent {
    own_s: f64,
    postgres_s: f64,
}

impl Cpu {
    fn now() -> Self {
        let own = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| cpu_ticks(&s).map(|(_, t)| t));
        let mut postgres = 0;
        let mut seen = false;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            if let Some(("postgres", t)) = cpu_ticks(&stat) {
                postgres += t;
                seen = true;
            }
        }
        Cpu(own.zip(seen.then_some(postgres)))
    }

    fn since(&self, before: &Cpu) -> Option<CpuSpent> {
        let ((own1, pg1), (own0, pg0)) = (self.0?, before.0?);
        // Clock ticks; 100 per second on Linux unless the kernel was built otherwise.
        let tick = 0.01;
        // Processes that ended in between take their ticks with them: clamp at zero.
        Some(CpuSpent { own_s: own1.saturating_sub(own0) as f64 * tick, postgres_s: pg1.saturating_sub(pg0) as f64 * tick })
    }
}

/// (command name, user + system ticks) from a `/proc/<pid>/stat` line.
fn cpu_ticks(stat: &str) -> Option<(&str, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = &stat[open + 1..close];
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let mut rest = stat[close + 1..].split_ascii_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((comm, utime + stime))
}

fn list(v: impl Iterator<Item = f64>) -> String {
    v.map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ")
}
