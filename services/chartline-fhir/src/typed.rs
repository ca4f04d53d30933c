//! The typed layer: `fhir-sdk`'s R4B models as a structural validator.
//!
//! R4B's models parse R4 clinical JSON but are lossy: an unknown element, or a choice
//! element (`value[x]`) whose value does not fit its type, is dropped silently. So the
//! check is a round trip: parse, serialize, and compare with what was sent; anything
//! that did not survive is an unknown element or an invalid value at that path.
//! Resource types that R4B does not have (R4-only ones such as `MedicinalProduct`) are
//! skipped and rest on the JSON-level checks alone.

use fhir_sdk::r4b::resources::Resource;
use serde::Deserialize;

use crate::tree::Json as Value;

use crate::error::{Issue, IssueCode};
use crate::typed_de::{Failed, Quiet};

/// The outcome of the typed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypedCheck {
    /// The resource round-tripped through the typed model unchanged.
    Passed,
    /// The typed model does not cover this resource type.
    Skipped(&'static str),
    /// The typed model rejected or changed the resource.
    Failed(Issue),
}

// Parsing a `Resource` instantiates a very large amount of serde code: these two
// functions are the only places it happens, kept out of line and non-generic so the
// cost is paid once, in this crate.
macro_rules! r4b_resource_types {
    ($($name:ident),* $(,)?) => {
        /// The typed model of `v`, whose `resourceType` is `ty`; None when R4B has no such
        /// type. Straight from the tree (no re-encoding and re-parsing of the text), and
        /// straight into the resource's own type: going through the `resourceType`-tagged
        /// `Resource` enum makes serde copy the whole resource into a buffer first to find
        /// the tag, which we already know.
        ///
        /// Through [`Quiet`]: errors carry no message (see `typed_de`).
        #[inline(never)]
        fn parse_typed(ty: &str, v: &Value) -> Option<Result<Resource, Failed>> {
            use fhir_sdk::r4b::resources as r;
            Some(match ty {
                $(stringify!($name) => r::$name::deserialize(Quiet(v)).map(Resource::$name),)*
                _ => return None,
            })
        }

        /// The same parse through serde_json's own `&Value` deserializer: what the typed
        /// check used before `Quiet`, kept as the tests' reference.
        #[cfg(test)]
        fn parse_typed_reference(ty: &str, v: &serde_json::Value) -> Option<Result<Resource, serde_json::Error>> {
            use fhir_sdk::r4b::resources as r;
            Some(match ty {
                $(stringify!($name) => r::$name::deserialize(v).map(Resource::$name),)*
                _ => return None,
            })
        }
    };
}

r4b_resource_types!(
    Account, ActivityDefinition, AdministrableProductDefinition, AdverseEvent, AllergyIntolerance,
    Appointment, AppointmentResponse, AuditEvent, Basic, Binary, BiologicallyDerivedProduct,
    BodyStructure, Bundle, CapabilityStatement, CarePlan, CareTeam, CatalogEntry, ChargeItem,
    ChargeItemDefinition, Citation, Claim, ClaimResponse, ClinicalImpression, ClinicalUseDefinition,
    CodeSystem, Communication, CommunicationRequest, CompartmentDefinition, Composition, ConceptMap,
    Condition, Consent, Contract, Coverage, CoverageEligibilityRequest, CoverageEligibilityResponse,
    DetectedIssue, Device, DeviceDefinition, DeviceMetric, DeviceRequest, DeviceUseStatement,
    DiagnosticReport, DocumentManifest, DocumentReference, Encounter, Endpoint, EnrollmentRequest,
    EnrollmentResponse, EpisodeOfCare, EventDefinition, Evidence, EvidenceReport, EvidenceVariable,
    ExampleScenario, ExplanationOfBenefit, FamilyMemberHistory, Flag, Goal, GraphDefinition, Group,
    GuidanceResponse, HealthcareService, ImagingStudy, Immunization, ImmunizationEvaluation,
    ImmunizationRecommendation, ImplementationGuide, Ingredient, InsurancePlan, Invoice, Library,
    Linkage, List, Location, ManufacturedItemDefinition, Measure, MeasureReport, Media, Medication,
    MedicationAdministration, MedicationDispense, MedicationKnowledge, MedicationRequest,
    MedicationStatement, MedicinalProductDefinition, MessageDefinition, MessageHeader,
    MolecularSequence, NamingSystem, NutritionOrder, NutritionProduct, Observation,
    ObservationDefinition, OperationDefinition, OperationOutcome, Organization, OrganizationAffiliation,
    PackagedProductDefinition, Parameters, Patient, PaymentNotice, PaymentReconciliation, Person,
    PlanDefinition, Practitioner, PractitionerRole, Procedure, Provenance, Questionnaire,
    QuestionnaireResponse, RegulatedAuthorization, RelatedPerson, RequestGroup, ResearchDefinition,
    ResearchElementDefinition, ResearchStudy, ResearchSubject, RiskAssessment, Schedule,
    SearchParameter, ServiceRequest, Slot, Specimen, SpecimenDefinition, StructureDefinition,
    StructureMap, Subscription, SubscriptionStatus, SubscriptionTopic, Substance, SubstanceDefinition,
    SupplyDelivery, SupplyRequest, Task, TerminologyCapabilities, TestReport, TestScript, ValueSet,
    VerificationResult, VisionPrescription
);

#[inline(never)]
fn compare_typed(orig: &Value, resource: &Resource, path: &mut String) -> Result<Option<String>, crate::typed_compare::Error> {
    crate::typed_compare::first_mismatch(orig, resource, path)
}

/// Runs the typed round trip on one resource (a Bundle is checked without its entries'
/// resources; callers check those one by one).
pub fn typed_check(v: &Value) -> TypedCheck {
    let ty = v.get("resourceType").and_then(Value::as_str).unwrap_or("Resource");
    let typed = match parse_typed(ty, v) {
        None => return TypedCheck::Skipped("resource type not in the R4B models"),
        Some(Ok(t)) => t,
        Some(Err(_)) => {
            // Once more with serde's messages kept, for the outcome.
            let msg = crate::typed_de::explain(|| parse_typed(ty, v).unwrap_or(Err(Failed(None)))).to_string();
            return TypedCheck::Failed(
                Issue::error(IssueCode::Invalid, format!("does not match the FHIR structure or holds an invalid value: {}", redact(&msg))).at(ty),
            );
        }
    };
    // The typed model serialized against what was sent: anything that did not survive is
    // an unknown element or an invalid value at that path.
    let mut path = ty.to_owned();
    match compare_typed(v, &typed, &mut path) {
        Ok(None) => TypedCheck::Passed,
        Ok(Some(p)) => TypedCheck::Failed(
            Issue::error(IssueCode::Structure, "unknown element, or a value of the wrong type for this element").at(p),
        ),
        Err(_) => TypedCheck::Failed(Issue::error(IssueCode::Exception, "could not serialize the typed resource")),
    }
}

/// Serde's messages quote the offending value; values may be patient content.
fn redact(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in msg.chars() {
        match quote {
            // serde prints a quoted value escaped: `\"` inside it does not end it.
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None if c == '"' => {
                out.push(c);
                quote = Some('"');
            }
            None => out.push(c),
        }
    }
    // Drop serde's "at line x column y": it points into our re-encoding, not the input.
    match out.find(" at line ") {
        Some(i) => out[..i].to_owned(),
        None => out,
    }
}

/// The reference for [`crate::typed_compare`]: the first difference between the sent tree
/// and the typed model's serialized tree.
#[cfg(test)]
fn first_difference(orig: &serde_json::Value, round: &serde_json::Value, path: &mut String) -> Option<String> {
    use serde_json::Value;
    match (orig, round) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, av) in a {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                match b.get(k) {
                    None => return Some(path.clone()),
                    Some(bv) => {
                        if let Some(p) = first_difference(av, bv, path) {
                            return Some(p);
                        }
                    }
                }
                path.truncate(len);
            }
            None
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Some(path.clone());
            }
            for (i, (av, bv)) in a.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if let Some(p) = first_difference(av, bv, path) {
                    return Some(p);
                }
                path.truncate(len);
            }
            None
        }
        (Value::Number(a), Value::Number(b)) => {
            let (x, y) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
            let same = a == b || x == y || ((x - y).abs() <= 1e-9 * x.abs().max(y.abs()));
            if same { None } else { Some(path.clone()) }
        }
        (Value::String(a), Value::String(b)) => {
            // base64Binary may carry whitespace, which the typed model drops on re-encoding.
            let same_base64 = || a.split_ascii_whitespace().collect::<String>() == *b;
            if a == b || same_instant(a, b) || same_base64() { None } else { Some(path.clone()) }
        }
        (a, b) if a == b => None,
        _ => Some(path.clone()),
    }
}

/// `2020-01-01T00:00:00+00:00` and `2020-01-01T00:00:00Z` are the same instant.
pub(crate) fn same_instant(a: &str, b: &str) -> bool {
    match (chrono::DateTime::parse_from_rfc3339(a), chrono::DateTime::parse_from_rfc3339(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn lean(v: &Value) -> crate::Json {
        crate::Json::from(v.clone())
    }

    #[test]
    fn every_r4_type_that_r4b_models_is_parsed_into_its_own_type() {
        use std::str::FromStr;
        let mut modelled = 0;
        for &name in crate::R4_RESOURCE_TYPES {
            let in_r4b = fhir_sdk::r4b::resources::ResourceType::from_str(name).is_ok();
            let v = serde_json::json!({"resourceType": name, "id": "x"});
            match parse_typed(name, &lean(&v)) {
                None => assert!(!in_r4b, "{name} is an R4B resource type but is not parsed"),
                Some(parsed) => {
                    assert!(in_r4b, "{name}");
                    modelled += 1;
                    // A minimal resource may miss required elements; when it parses, it
                    // must be the variant of its own type.
                    if let Ok(r) = parsed {
                        let back = serde_json::to_value(&r).expect("serializes");
                        assert_eq!(back["resourceType"], name);
                    }
                }
            }
        }
        assert_eq!(modelled, 128, "R4 types that R4B models (the others rest on the JSON-level checks)");
        assert_eq!(typed_check(&lean(&serde_json::json!({"resourceType": "MedicinalProduct"}))), TypedCheck::Skipped("resource type not in the R4B models"));
    }

    #[test]
    fn redaction_hides_quoted_values() {
        assert_eq!(redact(r#"invalid type: string "John Smith", expected a date at line 1 column 5"#), "invalid type: string \"…\", expected a date");
        // An escaped quote inside the value does not end it (the rest stays hidden).
        assert_eq!(redact(r#"invalid type: string "x\" SSN 123", expected a boolean"#), "invalid type: string \"…\", expected a boolean");
        let v = serde_json::json!({"resourceType": "Patient", "active": "x\" SSN 123"});
        let TypedCheck::Failed(issue) = typed_check(&lean(&v)) else { panic!("a string for a boolean passed") };
        assert!(!issue.diagnostics.contains("SSN"), "{}", issue.diagnostics);
    }

    #[test]
    fn numbers_compare_by_value() {
        let a: Value = serde_json::from_str(r#"{"v": 82.30}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"v": 82.3}"#).unwrap();
        assert_eq!(first_difference(&a, &b, &mut String::new()), None);
    }

    /// Every resource of the HL7 examples, US Core, the validator inputs and two Synthea
    /// patients (Bundle entries included), as parsed JSON.
    fn fixture_resources() -> Vec<Value> {
        let root = crate::test_fixtures();
        let mut files = Vec::new();
        for dir in ["fhir-r4-examples", "us-core", "validator-cases/inputs"] {
            for e in std::fs::read_dir(root.join(dir)).unwrap() {
                files.push(e.unwrap().path());
            }
        }
        let mut synthea: Vec<_> =
            std::fs::read_dir(root.join("synthea/blaze-synthea-2.7.0")).unwrap().map(|e| e.unwrap().path()).collect();
        synthea.sort();
        files.extend(synthea.into_iter().take(4));
        let mut out = Vec::new();
        for f in files {
            let Ok(bytes) = std::fs::read(&f) else { continue };
            let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { continue };
            if let Some(entries) = v.get("entry").and_then(Value::as_array) {
                out.extend(entries.iter().filter_map(|e| e.get("resource")).cloned());
            }
            out.push(v);
        }
        out
    }

    /// Unknown elements put where the typed model will drop them: first and last in key
    /// order at the top, and inside the first object-valued element (or its first item).
    fn mutations(v: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        for key in ["aaUnknown", "zzUnknown"] {
            let mut m = v.clone();
            m[key] = Value::Bool(true);
            out.push(m);
        }
        let mut m = v.clone();
        if let Some(obj) = m.as_object_mut() {
            for (k, child) in obj.iter_mut() {
                let target = match child {
                    Value::Object(_) => Some(child),
                    Value::Array(items) => items.first_mut().filter(|i| i.is_object()),
                    _ => None,
                };
                if let Some(t) = target {
                    if k != "meta" {
                        t["unknownChild"] = Value::String("x".into());
                        // Two drops: the nested one comes first in key order.
                        let mut both = m.clone();
                        both["zzUnknown"] = Value::Bool(true);
                        out.push(m);
                        out.push(both);
                        break;
                    }
                }
            }
        }
        out
    }

    /// Every fixture resource, and the `mutate`d variants of every `every`-th one, with its
    /// resource type.
    fn each_case(every: usize, mutate: fn(&Value) -> Vec<Value>, mut f: impl FnMut(&str, &Value)) {
        for (i, r) in fixture_resources().iter().enumerate() {
            let variants = if i % every == 0 { mutate(r) } else { Vec::new() };
            for v in std::iter::once(r).chain(&variants) {
                f(v.get("resourceType").and_then(Value::as_str).unwrap_or("Resource"), v);
            }
        }
    }

    /// Values of the wrong JSON kind in the first few elements: a string where a number,
    /// object or array goes and the other way round.
    fn wrong_kinds(v: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        let Some(obj) = v.as_object() else { return out };
        for (k, child) in obj.iter().filter(|(k, _)| *k != "resourceType").take(4) {
            let swapped = match child {
                Value::String(_) => Value::from(7),
                Value::Bool(_) | Value::Number(_) => Value::from("7"),
                Value::Array(items) => items.first().cloned().unwrap_or(Value::Null),
                Value::Object(_) => Value::Array(vec![child.clone()]),
                Value::Null => Value::Bool(true),
            };
            let mut m = v.clone();
            m[k.as_str()] = swapped;
            out.push(m);
        }
        out
    }

    #[test]
    fn the_quiet_parse_gives_what_serde_json_gives() {
        let (mut same, mut both_failed) = (0, 0);
        each_case(5, wrong_kinds, |ty, v| {
            let Some(quiet) = parse_typed(ty, &lean(v)) else { return };
            let reference = parse_typed_reference(ty, v).expect("the same types");
            match (quiet, reference) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{ty} {:?}", v.get("id"));
                    same += 1;
                }
                (Err(_), Err(_)) => both_failed += 1,
                (a, b) => panic!("{ty} {:?}: quiet {:?}, serde_json {:?}", v.get("id"), a.err(), b.err()),
            }
        });
        assert!(same > 1000 && both_failed > 100, "{same} parsed, {both_failed} rejected by both");
    }

    #[test]
    fn a_failed_parse_is_explained_with_serdes_message() {
        let v = serde_json::json!({"resourceType": "Patient", "active": "yes"});
        let TypedCheck::Failed(issue) = typed_check(&lean(&v)) else { panic!("a string for a boolean passed") };
        assert!(issue.diagnostics.contains("invalid type: string \"…\", expected a boolean"), "{}", issue.diagnostics);
        // The message switch is off again: the next failure is quiet until explained.
        assert!(matches!(parse_typed("Patient", &lean(&v)), Some(Err(Failed(None)))));
    }

    #[test]
    fn the_streaming_comparison_agrees_with_comparing_serialized_trees() {
        let (mut compared, mut mismatches) = (0, 0);
        each_case(7, mutations, |ty, v| {
            let tree = lean(v);
            let Some(Ok(typed)) = parse_typed(ty, &tree) else { return };
            let round = serde_json::to_value(&typed).unwrap();
            let old = first_difference(v, &round, &mut ty.to_owned());
            let new = compare_typed(&tree, &typed, &mut ty.to_owned()).unwrap();
            assert_eq!(new, old, "{ty} {:?}", v.get("id"));
            compared += 1;
            mismatches += usize::from(new.is_some());
        });
        assert!(compared > 1000, "only {compared} resources compared");
        assert!(mismatches > 100, "only {mismatches} mismatches exercised");
    }
}
