//! `chartline bench-vision`: MedGemma 4B's vision tower (SigLIP, 896x896, 27 layers) on one
//! image against prefill of 256 text tokens through MedGemma 4B's text model (Q4_K, as a
//! CPU deployment runs it), random weights of the real shapes. Prints a Markdown table for
//! BENCHMARKS.md.

use std::process::ExitCode;

use anyhow::Context as _;
use chartline_inference::SafetensorsDtype;

use crate::config::BenchVisionArgs;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints the results.
pub async fn run(args: BenchVisionArgs) -> anyhow::Result<ExitCode> {
    let dtype: SafetensorsDtype = args.dtype.parse().context("--dtype")?;
    let runs = args.runs.max(1);
    let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let r = tokio::task::spawn_blocking(move || {
        chartline_inference::bench::run_vision_bench(runs, dtype)
    })
    .await
    .context("benchmark thread")??;
    let (tower, proj, prefill) = (median(&r.tower_ms), median(&r.projector_ms), median(&r.prefill_ms));
    println!("setup (random weights and random Q4_K blocks): {:.1} s", r.setup_s);
    println!("CANDLE_NUM_THREADS={threads}, tower weights {}, runs {runs}", args.dtype);
    println!();
    println!("| step (one 896x896 image, MedGemma 4B shapes) | median ms | runs (ms) |");
    println!("|---|---:|---|");
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    println!("| SigLIP tower (4096 patches, 27 layers) | {tower:.0} | {} |", fmt(&r.tower_ms));
    println!("| projector (pool 4x4, norm, projection) | {proj:.1} | {} |", fmt(&r.projector_ms));
    println!("| text prefill of {} tokens (Q4_K) | {prefill:.0} | {} |", r.soft_tokens, fmt(&r.prefill_ms));
    println!();
    println!(
        "image encoding / prefill of its {} soft tokens = {:.2}x; one image costs tower + projector + prefill = {:.1} s",
        r.soft_tokens,
        (tower + proj) / prefill,
        (tower + proj + prefill) / 1e3
    );
    Ok(ExitCode::SUCCESS)
}
