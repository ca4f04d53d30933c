//! CPU time of each Rust-side ingest phase over the Synthea fixtures, one thread, no
//! database, with serde_json's own parse and drop of its `Value` for comparison (BENCHMARKS.md, "Ingest": where the time goes). `cargo run --release --example
//! ingest_phases -p chartline [FOLDER]`.
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let dir = std::env::args().nth(1).unwrap_or("../shared/fixtures/synthea/blaze-synthea-2.7.0".into());
    let files = chartline::ingest_cli::collect_files(&[dir.into()]).unwrap();
    let bodies: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    // One thread throughout, the Bundles' entries included.
    let limits = chartline_fhir::Limits { validation_threads: 1, ..Default::default() };
    for round in 0..3 {
        let mut t = [0f64; 11];
        let names = [
            "serde_json::from_slice", "validate(all)", "typed", "canonical+hash", "events", "refs", "stored text", "patient_of", "parse_json",
            "drop (parse_json's)", "drop (serde_json's)",
        ];
        for b in &bodies {
            let s = Instant::now();
            // serde_json's own parse into its tree, for comparison with parse_json.
            let theirs = std::hint::black_box(serde_json::from_slice::<serde_json::Value>(b).unwrap());
            t[0] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            drop(theirs);
            t[10] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            // What ingest runs: one UTF-8 check, the parse with the nesting bound enforced.
            let v = chartline_fhir::parse_json(b, &limits).unwrap();
            t[8] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            chartline_fhir::validate_resource(&v, &limits).unwrap();
            t[1] += s.elapsed().as_secs_f64();
            let entries: Vec<&chartline_fhir::Json> = v["entry"].as_array().unwrap().iter().map(|e| &e["resource"]).collect();
            let s = Instant::now();
            for r in &entries {
                let _ = std::hint::black_box(chartline_fhir::typed_check(r));
            }
            t[2] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            let canonical: Vec<chartline_fhir::CanonicalJson> = entries.iter().map(|r| chartline_fhir::CanonicalJson::of(r)).collect();
            t[3] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            for r in &entries {
                std::hint::black_box(chartline_fhir::extract_events(r));
            }
            t[4] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            let mut n = 0;
            for r in &entries {
                chartline_fhir::for_each_reference(r, &mut |s| n += s.len());
            }
            std::hint::black_box(n);
            t[5] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            for c in &canonical {
                std::hint::black_box(c.with_server_meta("1", "2026-11-30T00:00:00.000000Z"));
            }
            t[6] += s.elapsed().as_secs_f64();
            let s = Instant::now();
            for r in &entries {
                std::hint::black_box(chartline_fhir::patient_of(r));
            }
            t[7] += s.elapsed().as_secs_f64();
            drop(entries);
            let s = Instant::now();
            drop(v);
            t[9] += s.elapsed().as_secs_f64();
        }
        if round == 2 {
            for (n, x) in names.iter().zip(t) {
                println!("{n:>22}: {:7.1} ms", x * 1e3);
            }
        }
    }
}
