//! Conformance of the FHIR validation layer: the HL7 reference validator's cases, and
//! every shipped real-world resource.

use std::collections::BTreeSet;

use chartline_fhir::{Limits, parse_json, validate_resource};
use serde_json::Value;
use tests::{fixtures, json_files, read_json};

/// Cases a structural validator cannot decide, with the reason.
const SKIPPED: &[(&str, &str)] = &[
    ("cvx", "needs a terminology server: the only error is a wrong CVX display name"),
    ("bundle-id-5", "needs a terminology server: the only error is a wrong CVX display name"),
    ("allergy", "needs R4 required-binding value sets: a required code is absent behind a data-absent extension"),
    ("pat-dob-ext", "needs extension StructureDefinitions: the error is an extension that cannot be resolved"),
    ("maiden-name-extension", "needs the extension's StructureDefinition context (HumanName.family)"),
    ("ips-htmlrefs-backwards", "needs extension definitions (narrativeLink value type) and XHTML anchor resolution across entries"),
    ("obs-temp-bad", "needs the core vital-signs profiles, applied from the SNOMED code"),
    ("parameters-reference-bad", "fails only under validateReference=CHECK_EXISTS_AND_TYPE (closed-world references); ingest accepts references to resources stored earlier"),
    ("bad-markdown-no-html", "needs element types (markdown vs string) and noHtmlInMarkdown, a non-default option"),
];

fn validate_bytes(bytes: &[u8], limits: &Limits) -> Result<(), chartline_fhir::FhirError> {
    let v = parse_json(bytes, limits)?;
    validate_resource(&v, limits).map(|_| ())
}

#[test]
fn every_runnable_validator_case_gets_the_reference_verdict_and_kind() {
    let root = fixtures().join("validator-cases");
    let manifest = read_json(&root.join("manifest-subset.json"));
    let cases = manifest["test-cases"].as_array().expect("manifest has test-cases");
    let mut ran = 0;
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap_or_default();
        if SKIPPED.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let input = std::fs::read(root.join("inputs").join(case["file"].as_str().unwrap_or_default())).expect("input exists");
        let expected = read_json(&root.join("expected-outcomes").join(case["java"].as_str().unwrap_or_default()));
        let expected_errors: BTreeSet<String> = expected["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| matches!(i["severity"].as_str(), Some("error" | "fatal")))
            .filter_map(|i| i["code"].as_str().map(str::to_owned))
            .collect();
        let limits = Limits { reject_html_in_strings: case["security-checks"] == Value::Bool(true), ..Limits::default() };
        let got = validate_bytes(&input, &limits);
        ran += 1;
        match (expected_errors.is_empty(), got) {
            (true, Ok(())) => {}
            (true, Err(e)) => failures.push(format!("{name}: must pass, rejected with {:?}", e.issues)),
            (false, Ok(())) => failures.push(format!("{name}: must fail with {expected_errors:?}, was accepted")),
            (false, Err(e)) => {
                let ours: BTreeSet<String> = e.issues.iter().map(|i| i.code.as_str().to_owned()).collect();
                if ours.is_disjoint(&expected_errors) {
                    failures.push(format!("{name}: expected a {expected_errors:?} error, got {:?}", e.issues));
                }
            }
        }
    }
    assert_eq!(ran + SKIPPED.len(), cases.len(), "every case is run or skipped with a reason");
    assert!(failures.is_empty(), "{} of {ran} validator cases disagree:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_shipped_real_world_resource_is_accepted() {
    let mut files = Vec::new();
    for dir in ["synthea/blaze-synthea-2.7.0", "synthea/smart-generated-sample-data-r4", "us-core", "fhir-r4-examples"] {
        files.extend(json_files(dir));
    }
    let mut rejected = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).expect("fixture readable");
        if let Err(e) = validate_bytes(&bytes, &Limits::default()) {
            rejected.push(format!("{}: {:?}", f.display(), e.issues.iter().take(3).collect::<Vec<_>>()));
        }
    }
    assert!(files.len() > 100, "the fixtures are there");
    assert!(rejected.is_empty(), "{} of {} real resources rejected:\n{}", rejected.len(), files.len(), rejected.join("\n"));
}
