//! Scratch: CPU time of each ingest phase over the Synthea fixtures, one thread.
use std::time::Instant;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use serde_json::Value;

fn main() {
    let dir = std::env::args().nth(1).unwrap_or("../shared/fixtures/synthea/blaze-synthea-2.7.0".into());
    let mut bodies = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") { bodies.push(std::fs::read(p).unwrap()); }
    }
    let limits = chartline_fhir::Limits::default();
    for round in 0..2 {
        let t = Instant::now();
        for b in &bodies { chartline_fhir::check_depth(b, 64).unwrap(); }
        let depth = t.elapsed();
        let t = Instant::now();
        let vals: Vec<Value> = bodies.iter().map(|b| serde_json::from_slice(b).unwrap()).collect();
        let parse = t.elapsed();
        let t = Instant::now();
        for v in &vals { chartline_fhir::validate_resource(v, &limits).unwrap(); }
        let validate = t.elapsed();
        let entries: Vec<&Value> = vals.iter().flat_map(|v| v["entry"].as_array().unwrap().iter().map(|e| &e["resource"])).collect();
        let t = Instant::now();
        for r in &entries { let _ = chartline_fhir::typed_check(r); }
        let typed = t.elapsed();
        let t = Instant::now();
        for r in &entries { std::hint::black_box(chartline_fhir::content_sha256(r)); }
        let hash = t.elapsed();
        let t = Instant::now();
        for r in &entries { std::hint::black_box(chartline_fhir::extract_events(r)); std::hint::black_box(chartline_fhir::patient_of(r)); }
        let events = t.elapsed();
        let t = Instant::now();
        let mut n = 0; for r in &entries { chartline_fhir::for_each_reference(r, &mut |_, _| n += 1); }
        let refs = t.elapsed();
        let t = Instant::now();
        let mut bytes = 0; for r in &entries { bytes += serde_json::to_string(r).unwrap().len(); }
        let ser = t.elapsed();
        let n_entries = entries.len(); drop(entries);
        let t = Instant::now();
        drop(vals);
        let drop_t = t.elapsed();
        println!("round {round}: {} resources: depth {depth:.2?} parse {parse:.2?} validate(all incl typed) {validate:.2?} typed alone {typed:.2?} hash {hash:.2?} events {events:.2?} refs({n}) {refs:.2?} serialize({bytes}) {ser:.2?} drop {drop_t:.2?}", n_entries);
    }
}
