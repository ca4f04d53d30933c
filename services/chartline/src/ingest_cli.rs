//! `chartline ingest PATH...`: files and folders straight into the store, with progress.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use chartline_ingest::{Counts, Ingestor, Interaction, Source};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::config::IngestArgs;

/// Expands folders and orders files as a FHIR server must take them: Synthea's hospital
/// and practitioner Bundles first (patients' conditional references resolve against
/// them), then everything else by name.
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "json" || x == "ndjson"))
                .collect();
            inner.sort_by_key(|f| load_order(f));
            files.extend(inner);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            anyhow::bail!("{} is neither a file nor a folder", p.display());
        }
    }
    Ok(files)
}

fn load_order(f: &Path) -> (u8, String) {
    let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let rank = if name.contains("hospitalInformation") {
        0
    } else if name.contains("practitionerInformation") {
        1
    } else {
        2
    };
    (rank, name)
}

/// What happened to one file.
pub enum FileOutcome {
    /// Stored (some entries may have been rejected).
    Stored(Counts),
    /// Rejected whole, with the OperationOutcome.
    Rejected(Value),
}

/// Ingests one file through `ingestor`.
pub async fn ingest_file(ingestor: &Ingestor, path: &Path, source: &Source) -> anyhow::Result<FileOutcome> {
    if path.extension().is_some_and(|x| x == "ndjson") {
        let file = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        let report = ingestor.ingest_ndjson(stream, source).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok(FileOutcome::Stored(report.counts));
    }
    let bytes = tokio::fs::read(path).await.with_context(|| format!("reading {}", path.display()))?;
    let head: Option<(String, Option<String>, Option<String>)> = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
        Some((
            v.get("resourceType")?.as_str()?.to_owned(),
            v.get("type").and_then(Value::as_str).map(str::to_owned),
            v.get("id").and_then(Value::as_str).map(str::to_owned),
        ))
    });
    let result = match head {
        Some((t, Some(kind), _)) if t == "Bundle" && (kind == "transaction" || kind == "batch") => {
            ingestor.ingest_bundle(&bytes, source).await.map(|r| r.counts)
        }
        Some((resource_type, _, Some(id))) => ingestor
            .ingest_resource(&bytes, Interaction::Update { resource_type, id }, source)
            .await
            .map(|r| one(r.outcome)),
        _ => ingestor
            .ingest_resource(&bytes, Interaction::Create { resource_type: None, if_none_exist: None }, source)
            .await
            .map(|r| one(r.outcome)),
    };
    match result {
        Ok(c) => Ok(FileOutcome::Stored(c)),
        Err(chartline_ingest::IngestError::Invalid(e)) => Ok(FileOutcome::Rejected(e.to_operation_outcome())),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

fn one(o: Option<chartline_store::WriteOutcome>) -> Counts {
    let mut c = Counts::default();
    match o {
        Some(chartline_store::WriteOutcome::Created) => c.created = 1,
        Some(chartline_store::WriteOutcome::Updated) => c.updated = 1,
        _ => c.unchanged = 1,
    }
    c
}

/// `chartline ingest`.
pub async fn run(args: IngestArgs) -> anyhow::Result<ExitCode> {
    let store = crate::server::open_store(&args.db).await?;
    let ingestor = Ingestor::new(store, args.limits.limits());
    let files = collect_files(&args.paths)?;
    let source = Source { sender: args.sender.clone(), channel: "cli" };
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} files  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut total = Counts::default();
    let mut rejected_files = 0;
    for f in &files {
        match ingest_file(&ingestor, f, &source).await? {
            FileOutcome::Stored(c) => total.add(&c),
            FileOutcome::Rejected(oo) => {
                rejected_files += 1;
                total.rejected += 1;
                let issue = &oo["issue"][0];
                bar.println(format!(
                    "rejected {}: {} {} ({})",
                    f.display(),
                    issue["code"].as_str().unwrap_or(""),
                    issue["diagnostics"].as_str().unwrap_or(""),
                    issue["expression"][0].as_str().unwrap_or("")
                ));
            }
        }
        bar.set_message(format!("{} created, {} updated, {} unchanged", total.created, total.updated, total.unchanged));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "{} files: {} created, {} updated, {} unchanged, {} rejected",
        files.len(),
        total.created,
        total.updated,
        total.unchanged,
        total.rejected
    );
    Ok(if rejected_files > 0 || total.rejected > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
