//! Throughput of the embedded models on this machine: Gemma 3 GGUF prefill (512-token prompt)
//! and decode (128 tokens; best of 3 runs each), and MiniLM embeddings at batch 32.
//!
//! ```text
//! cargo run --release -p chartline-inference --example bench_gguf [-- --no-requant] [--candle-kernels]
//! ```
//!
//! candle sizes its CPU worker pool from `CANDLE_NUM_THREADS` (default: physical cores); run
//! with `CANDLE_NUM_THREADS=2` for the 2-thread figures. Models come from
//! `CHARTLINE_MODELS_DIR` (default `<workspace>/models`).

use std::path::PathBuf;
use std::time::Instant;

use chartline_inference::{Backend, Embedder, GgufOptions, load_gguf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let models = std::env::var_os("CHARTLINE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let requantize_q5_0 = !std::env::args().any(|a| a == "--no-requant");
    let own_kernels = !std::env::args().any(|a| a == "--candle-kernels");
    println!(
        "threads: {} (CANDLE_NUM_THREADS / physical cores)",
        candle_threads()
    );

    let started = Instant::now();
    let options = GgufOptions {
        context_length: Some(2048),
        requantize_q5_0,
        own_kernels,
        ..Default::default()
    };
    let mut backend = load_gguf(
        models.join("gemma3-270m/gemma-3-270m-q4_k_m.gguf"),
        &options,
    )?;
    println!(
        "gemma load: {:.2} s (Q5_0 -> Q8_0: {requantize_q5_0}, own kernels: {own_kernels}), RSS {} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib("VmRSS")
    );

    let tokenizer = backend.tokenizer().ok_or("no tokenizer")?.clone();
    let text = "The patient is a 67-year-old man with a history of hypertension, type 2 diabetes mellitus \
                and chronic kidney disease stage 3, admitted with chest pain radiating to the left arm. ";
    let mut prompt = tokenizer.encode(&text.repeat(40), true)?;
    prompt.truncate(512);
    let model = backend.model_mut();

    // Warm-up: first calls pack weights for the x86 kernels.
    let mut logits = model.forward(&prompt, 0)?;
    for pos in 512..516 {
        logits = model.forward(&[argmax(&logits)], pos)?;
    }
    std::hint::black_box(&logits);

    let mut prefill = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        std::hint::black_box(model.forward(&prompt, 0)?);
        prefill.push(512.0 / t.elapsed().as_secs_f64());
    }
    // Three 128-token decodes, each after the prompt (this VM's neighbours make single
    // runs swing by 10-20 %; llama.cpp's side takes the best of three the same way).
    let mut decode = Vec::new();
    for _ in 0..3 {
        let mut logits = model.forward(&prompt, 0)?;
        let t = Instant::now();
        for pos in 512..512 + 128 {
            logits = model.forward(&[argmax(&logits)], pos)?;
        }
        decode.push(128.0 / t.elapsed().as_secs_f64());
    }
    let runs = |v: &[f64]| {
        v.iter()
            .map(|p| format!("{p:.0}"))
            .collect::<Vec<_>>()
            .join("/")
    };
    println!(
        "gemma3-270m Q4_K_M: prefill {:.1} tok/s (512-token prompt, best of 3; runs {}), decode {:.1} tok/s (128 tokens, best of 3; runs {})",
        prefill.iter().copied().fold(0.0, f64::max),
        runs(&prefill),
        decode.iter().copied().fold(0.0, f64::max),
        runs(&decode),
    );
    println!("peak RSS after gemma: {} MiB", rss_mib("VmHWM"));
    drop(backend);

    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let embedder = Embedder::load(models.join("all-minilm-l6-v2"))?;
    let batch: Vec<String> = (0..32)
        .map(|i| format!("Progress note {i}: patient reports improved shortness of breath after diuretics; plan to continue."))
        .collect();
    runtime.block_on(embedder.embed(batch.clone()))?;
    let rounds = 5;
    let t = Instant::now();
    for _ in 0..rounds {
        runtime.block_on(embedder.embed(batch.clone()))?;
    }
    let per_s = (rounds * batch.len()) as f64 / t.elapsed().as_secs_f64();
    println!("all-MiniLM-L6-v2: {per_s:.1} embeddings/s (batch 32, ~24 tokens each)");
    println!("peak RSS overall: {} MiB", rss_mib("VmHWM"));
    read_bandwidth();
    Ok(())
}

/// Memory read bandwidth with 2 threads (the decode threads): each sums half of a 1 GiB
/// buffer; best of 5. A decoded token streams the weights once, so weights bytes / this
/// rate bounds decode from above.
fn read_bandwidth() {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(words / 2)
                .map(|half| s.spawn(move || half.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        std::hint::black_box(sums);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    println!("memory read bandwidth, 2 threads: {best:.1} GB/s (best of 5, 1 GiB)");
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, x)| if *x > v[best] { i } else { best }) as u32
}

fn candle_threads() -> String {
    std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "default".into())
}

fn rss_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb / 1024)
}
