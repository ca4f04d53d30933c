//! What the JSON tree itself costs (BTreeMap-based `serde_json::Value` against a lean tree
//! of exactly-sized, key-sorted slices), one thread, over the Synthea fixtures: parse, one
//! full walk, drop. A probe for the ingest benchmark's next step (BENCHMARKS.md, "Ingest"),
//! not product code. `cargo run --release --example tree_costs -p chartline [FOLDER]`.
use std::time::Instant;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The lean tree: objects as boxed slices sorted by key (binary search replaces the B-tree),
/// arrays as boxed slices, no spare capacity anywhere. The scalars are held as a real tree
/// would hold them; the probe's walk only counts them.
#[allow(dead_code)]
enum Lean {
    Null,
    Bool(bool),
    Number(f64),
    String(Box<str>),
    Array(Box<[Lean]>),
    Object(Box<[(Box<str>, Lean)]>),
}

impl<'de> Deserialize<'de> for Lean {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lean;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Lean, E> {
                Ok(Lean::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Lean, E> {
                Ok(Lean::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Lean, E> {
                Ok(Lean::Number(n as f64))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Lean, E> {
                Ok(Lean::Number(n as f64))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Lean, E> {
                Ok(Lean::Number(n))
            }
            fn visit_str<E>(self, s: &str) -> Result<Lean, E> {
                Ok(Lean::String(s.into()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Lean, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Lean::Array(v.into_boxed_slice()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Lean, A::Error> {
                let mut v: Vec<(Box<str>, Lean)> = Vec::new();
                while let Some(k) = a.next_key::<std::borrow::Cow<'de, str>>()? {
                    let x = a.next_value()?;
                    v.push((k.as_ref().into(), x));
                }
                v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                Ok(Lean::Object(v.into_boxed_slice()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Bytes of keys and strings plus one per scalar: a walk that touches every node.
fn walk_lean(v: &Lean) -> usize {
    match v {
        Lean::Object(m) => m.iter().map(|(k, c)| k.len() + walk_lean(c)).sum(),
        Lean::Array(a) => a.iter().map(walk_lean).sum(),
        Lean::String(s) => s.len(),
        Lean::Null | Lean::Bool(_) | Lean::Number(_) => 1,
    }
}

fn walk_value(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    match v {
        Value::Object(m) => m.iter().map(|(k, c)| k.len() + walk_value(c)).sum(),
        Value::Array(a) => a.iter().map(walk_value).sum(),
        Value::String(s) => s.len(),
        Value::Null | Value::Bool(_) | Value::Number(_) => 1,
    }
}

/// Parses `body` into a `T`, walks it and drops it, adding the three times (seconds) to
/// `spent`; returns what the walk counted.
fn measure<T: serde::de::DeserializeOwned>(body: &[u8], walk: fn(&T) -> usize, spent: &mut [f64; 3]) -> usize {
    let t = Instant::now();
    let tree: T = serde_json::from_slice(body).unwrap();
    spent[0] += t.elapsed().as_secs_f64();
    let t = Instant::now();
    let n = walk(&tree);
    spent[1] += t.elapsed().as_secs_f64();
    let t = Instant::now();
    drop(tree);
    spent[2] += t.elapsed().as_secs_f64();
    n
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or("../shared/fixtures/synthea/blaze-synthea-2.7.0".into());
    let files = chartline::ingest_cli::collect_files(&[dir.into()]).unwrap();
    let bodies: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for round in 0..4 {
        // [parse, walk, drop] for each tree.
        let (mut value, mut lean) = ([0f64; 3], [0f64; 3]);
        let (mut n_value, mut n_lean) = (0, 0);
        for b in &bodies {
            n_value += measure::<serde_json::Value>(b, walk_value, &mut value);
            n_lean += measure::<Lean>(b, walk_lean, &mut lean);
        }
        // Both walks must have seen the same tree.
        assert_eq!(n_value, n_lean);
        if round > 0 {
            let ms = |t: [f64; 3]| format!("parse {:5.1} walk {:5.1} drop {:5.1} ms", t[0] * 1e3, t[1] * 1e3, t[2] * 1e3);
            println!("serde_json::Value: {} | lean: {}", ms(value), ms(lean));
        }
    }
}
