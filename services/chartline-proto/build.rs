//! Compiles `proto/chartline/v1/*.proto` with the vendored protoc (no system protoc needed).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let mut protos: Vec<PathBuf> = std::fs::read_dir(root.join("chartline/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("chartline_descriptor.bin"))
        .compile_with_config(config, &protos, &[root.clone(), protoc_bin_vendored::include_path()?])?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
