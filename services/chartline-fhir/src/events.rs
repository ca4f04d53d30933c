//! The flat `patient_event` rows derived from clinical resources, so that a timeline is
//! an indexed SELECT and never a walk over stored JSON.

use chrono::{DateTime, NaiveDate, Utc};
use crate::tree::Json as Value;

use crate::reference::{Reference, parse_reference};

/// One row of the patient timeline index.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientEvent {
    /// `condition`, `observation`, `medication`, `allergy`, `immunization`, `procedure`,
    /// `encounter`, `diagnostic-report`, `document`, `care-plan`, `imaging-study`, `media`.
    pub kind: &'static str,
    /// 0 for the resource itself; 1.. for an Observation's components.
    pub component: i32,
    /// The clinically relevant time (onset, effective, authored, performed, period start).
    pub time: Option<DateTime<Utc>>,
    /// End of a period (abatement, encounter end, care plan end), when known.
    pub end_time: Option<DateTime<Utc>>,
    /// A category code (observation category, encounter class, allergy category…).
    pub category: Option<String>,
    /// Code system of the main code.
    pub code_system: Option<String>,
    /// The main code.
    pub code: Option<String>,
    /// Display of the main code (coding display, else CodeableConcept.text).
    pub display: Option<String>,
    /// A numeric value (Observation valueQuantity, valueInteger…).
    pub value_num: Option<f64>,
    /// A textual value (coded value display, string value, dose text, criticality…).
    pub value_text: Option<String>,
    /// The unit of `value_num`.
    pub unit: Option<String>,
    /// Reference range low bound.
    pub ref_low: Option<f64>,
    /// Reference range high bound.
    pub ref_high: Option<f64>,
    /// Interpretation code (H, L, A, N…).
    pub interpretation: Option<String>,
    /// The resource's status (clinicalStatus for conditions and allergies).
    pub status: Option<String>,
}

impl PatientEvent {
    fn new(kind: &'static str) -> Self {
        PatientEvent {
            kind,
            component: 0,
            time: None,
            end_time: None,
            category: None,
            code_system: None,
            code: None,
            display: None,
            value_num: None,
            value_text: None,
            unit: None,
            ref_low: None,
            ref_high: None,
            interpretation: None,
            status: None,
        }
    }

    fn with_code(mut self, cc: Option<&Value>) -> Self {
        if let Some(cc) = cc {
            let (system, code, display) = codeable(cc);
            self.code_system = system;
            self.code = code;
            self.display = display;
        }
        self
    }
}

/// The id of the patient whose compartment holds this resource, when the resource
/// references exactly one Patient through its subject/patient element (or is one).
pub fn patient_of(resource: &Value) -> Option<String> {
    let ty = resource.get("resourceType")?.as_str()?;
    if ty == "Patient" {
        return resource.get("id")?.as_str().map(str::to_owned);
    }
    let fields: &[&str] = match ty {
        "Provenance" => &["target"],
        "Coverage" => &["beneficiary"],
        "Group" | "Practitioner" | "Organization" | "Location" | "Medication" | "PractitionerRole" => return None,
        _ => &["subject", "patient", "beneficiary"],
    };
    for f in fields {
        let refs: Vec<&Value> = match resource.get(*f) {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => vec![v],
            None => continue,
        };
        for r in refs {
            if let Some(s) = r.get("reference").and_then(Value::as_str) {
                if let Reference::Literal { resource_type: "Patient", id, absolute: false, .. } = parse_reference(s) {
                    return Some(id.to_owned());
                }
            }
        }
    }
    None
}

/// The timeline rows for one resource; empty for types the timeline does not show.
pub fn extract_events(r: &Value) -> Vec<PatientEvent> {
    let ty = r.get("resourceType").and_then(Value::as_str).unwrap_or("");
    match ty {
        "Condition" => {
            let mut e = PatientEvent::new("condition").with_code(r.get("code"));
            e.time = first_time(r, &["onsetDateTime", "onsetPeriod.start", "recordedDate"]);
            e.end_time = first_time(r, &["abatementDateTime", "abatementPeriod.end"]);
            e.status = r.get("clinicalStatus").and_then(|c| codeable(c).1);
            e.category = r.pointer("/category/0").and_then(|c| codeable(c).1);
            e.value_text = r.get("verificationStatus").and_then(|c| codeable(c).1);
            vec![e]
        }
        "Observation" => observation(r),
        "MedicationRequest" | "MedicationStatement" | "MedicationAdministration" | "MedicationDispense" => {
            let mut e = PatientEvent::new("medication").with_code(r.get("medicationCodeableConcept"));
            if e.code.is_none() && e.display.is_none() {
                e.display = r.pointer("/medicationReference/display").and_then(str_of);
                e.code = r.pointer("/medicationReference/reference").and_then(str_of);
            }
            e.time = first_time(
                r,
                &["authoredOn", "effectiveDateTime", "effectivePeriod.start", "dateAsserted", "whenHandedOver", "whenPrepared"],
            );
            e.end_time = first_time(r, &["effectivePeriod.end", "dispenseRequest.validityPeriod.end"]);
            e.status = str_at(r, "status");
            e.category = Some(ty.to_owned());
            e.value_text = r
                .pointer("/dosageInstruction/0/text")
                .or_else(|| r.pointer("/dosage/0/text"))
                .or_else(|| r.pointer("/dosage/text"))
                .and_then(str_of);
            vec![e]
        }
        "AllergyIntolerance" => {
            let mut e = PatientEvent::new("allergy").with_code(r.get("code"));
            e.time = first_time(r, &["onsetDateTime", "recordedDate"]);
            e.status = r.get("clinicalStatus").and_then(|c| codeable(c).1);
            e.category = r.pointer("/category/0").and_then(str_of);
            e.value_text = str_at(r, "criticality");
            e.interpretation = r.pointer("/reaction/0/manifestation/0").and_then(|c| codeable(c).2);
            vec![e]
        }
        "Immunization" => {
            let mut e = PatientEvent::new("immunization").with_code(r.get("vaccineCode"));
            e.time = first_time(r, &["occurrenceDateTime", "recorded"]);
            e.status = str_at(r, "status");
            vec![e]
        }
        "Procedure" => {
            let mut e = PatientEvent::new("procedure").with_code(r.get("code"));
            e.time = first_time(r, &["performedDateTime", "performedPeriod.start"]);
            e.end_time = first_time(r, &["performedPeriod.end"]);
            e.status = str_at(r, "status");
            vec![e]
        }
        "Encounter" => {
            let mut e = PatientEvent::new("encounter").with_code(r.pointer("/type/0"));
            e.time = first_time(r, &["period.start"]);
            e.end_time = first_time(r, &["period.end"]);
            e.status = str_at(r, "status");
            e.category = r.pointer("/class/code").and_then(str_of);
            e.value_text = r.pointer("/reasonCode/0").and_then(|c| codeable(c).2);
            vec![e]
        }
        "DiagnosticReport" => {
            let mut e = PatientEvent::new("diagnostic-report").with_code(r.get("code"));
            e.time = first_time(r, &["effectiveDateTime", "effectivePeriod.start", "issued"]);
            e.status = str_at(r, "status");
            e.category = r.pointer("/category/0").and_then(|c| codeable(c).1);
            e.value_text = str_at(r, "conclusion");
            vec![e]
        }
        "DocumentReference" => {
            let mut e = PatientEvent::new("document").with_code(r.get("type"));
            e.time = first_time(r, &["context.period.start", "date"]);
            e.end_time = first_time(r, &["context.period.end"]);
            e.status = str_at(r, "status");
            e.category = r.pointer("/category/0").and_then(|c| codeable(c).1);
            e.value_text = r.pointer("/content/0/attachment/contentType").and_then(str_of);
            vec![e]
        }
        "CarePlan" => {
            let mut e = PatientEvent::new("care-plan").with_code(r.pointer("/category/1").or_else(|| r.pointer("/category/0")));
            e.time = first_time(r, &["period.start", "created"]);
            e.end_time = first_time(r, &["period.end"]);
            e.status = str_at(r, "status");
            vec![e]
        }
        "ImagingStudy" => {
            let mut e = PatientEvent::new("imaging-study").with_code(r.pointer("/procedureCode/0"));
            if e.code.is_none() {
                let m = r.pointer("/modality/0");
                e.code_system = m.and_then(|m| str_at(m, "system"));
                e.code = m.and_then(|m| str_at(m, "code"));
                e.display = m.and_then(|m| str_at(m, "display"));
            }
            e.time = first_time(r, &["started"]);
            e.status = str_at(r, "status");
            e.category = r.pointer("/modality/0/code").and_then(str_of);
            e.value_num = r.get("numberOfInstances").and_then(Value::as_f64);
            vec![e]
        }
        "Media" => {
            let mut e = PatientEvent::new("media").with_code(r.get("modality").or_else(|| r.get("type")));
            e.time = first_time(r, &["createdDateTime", "createdPeriod.start", "issued"]);
            e.status = str_at(r, "status");
            e.value_text = r.pointer("/content/contentType").and_then(str_of);
            vec![e]
        }
        _ => Vec::new(),
    }
}

fn observation(r: &Value) -> Vec<PatientEvent> {
    let mut e = PatientEvent::new("observation").with_code(r.get("code"));
    e.time = first_time(r, &["effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"]);
    e.end_time = first_time(r, &["effectivePeriod.end"]);
    e.status = str_at(r, "status");
    e.category = r.pointer("/category/0").and_then(|c| codeable(c).1);
    set_value(&mut e, r);
    let mut out = vec![e];
    if let Some(components) = r.get("component").and_then(Value::as_array) {
        for (i, c) in components.iter().enumerate() {
            let base = &out[0];
            let mut ce = PatientEvent::new("observation").with_code(c.get("code"));
            ce.component = i as i32 + 1;
            ce.time = base.time;
            ce.end_time = base.end_time;
            ce.status = base.status.clone();
            ce.category = base.category.clone();
            set_value(&mut ce, c);
            out.push(ce);
        }
    }
    out
}

/// `value[x]`, reference range and interpretation of an Observation or a component.
fn set_value(e: &mut PatientEvent, o: &Value) {
    if let Some(q) = o.get("valueQuantity") {
        e.value_num = q.get("value").and_then(Value::as_f64);
        e.unit = q.get("unit").or_else(|| q.get("code")).and_then(str_of);
        if let Some(cmp) = q.get("comparator").and_then(Value::as_str) {
            e.value_text = Some(cmp.to_owned());
        }
    } else if let Some(v) = o.get("valueInteger").and_then(Value::as_f64) {
        e.value_num = Some(v);
    } else if let Some(cc) = o.get("valueCodeableConcept") {
        let (_, code, display) = codeable(cc);
        e.value_text = display.or(code);
    } else if let Some(s) = o.get("valueString").and_then(str_of) {
        e.value_text = Some(s);
    } else if let Some(b) = o.get("valueBoolean").and_then(Value::as_bool) {
        e.value_text = Some(b.to_string());
    } else if let Some(s) = o.get("valueDateTime").and_then(str_of) {
        e.value_text = Some(s);
    } else if let Some(ratio) = o.get("valueRatio") {
        let n = ratio.pointer("/numerator/value").and_then(Value::as_f64);
        let d = ratio.pointer("/denominator/value").and_then(Value::as_f64);
        if let (Some(n), Some(d)) = (n, d) {
            e.value_text = Some(format!("{n}/{d}"));
        }
    } else if let Some(dar) = o.get("dataAbsentReason") {
        let (_, code, display) = codeable(dar);
        e.value_text = Some(format!("data absent: {}", display.or(code).unwrap_or_default()));
    }
    if let Some(rr) = o.pointer("/referenceRange/0") {
        e.ref_low = rr.pointer("/low/value").and_then(Value::as_f64);
        e.ref_high = rr.pointer("/high/value").and_then(Value::as_f64);
    }
    e.interpretation = o.pointer("/interpretation/0").and_then(|c| codeable(c).1);
}

/// (system, code, display) of a CodeableConcept's first coding; display falls back to text.
fn codeable(cc: &Value) -> (Option<String>, Option<String>, Option<String>) {
    let coding = cc.pointer("/coding/0");
    let system = coding.and_then(|c| str_at(c, "system"));
    let code = coding.and_then(|c| str_at(c, "code"));
    let display = coding.and_then(|c| str_at(c, "display")).or_else(|| str_at(cc, "text"));
    (system, code, display)
}

fn str_of(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

fn str_at(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(str_of)
}

fn first_time(r: &Value, paths: &[&str]) -> Option<DateTime<Utc>> {
    paths.iter().find_map(|p| {
        let mut cur = r;
        for part in p.split('.') {
            cur = cur.get(part)?;
        }
        cur.as_str().and_then(parse_fhir_time)
    })
}

/// A FHIR date, dateTime or instant as the start of the period it names (UTC).
pub(crate) fn parse_fhir_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let date = match s.len() {
        4 => NaiveDate::from_ymd_opt(s.parse().ok()?, 1, 1)?,
        7 => NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").ok()?,
        10 => NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?,
        _ => return None,
    };
    Some(date.and_hms_opt(0, 0, 0)?.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blood_pressure_components_become_rows_of_their_own() {
        let obs = tree!({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2020-02-01T10:00:00+01:00",
            "component": [
                {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 140, "unit": "mm[Hg]"}},
                {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, "valueQuantity": {"value": 90, "unit": "mm[Hg]"}}
            ]
        });
        let ev = extract_events(&obs);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[1].code.as_deref(), Some("8480-6"));
        assert_eq!(ev[1].value_num, Some(140.0));
        assert_eq!(ev[2].component, 2);
        assert_eq!(ev[0].category.as_deref(), Some("vital-signs"));
        assert_eq!(ev[0].time.map(|t| t.to_rfc3339()), Some("2020-02-01T09:00:00+00:00".to_owned()));
        assert_eq!(patient_of(&obs).as_deref(), Some("p1"));
    }

    #[test]
    fn partial_dates_mean_the_start_of_their_period() {
        assert_eq!(parse_fhir_time("2019").map(|t| t.to_rfc3339()), Some("2019-01-01T00:00:00+00:00".to_owned()));
        assert_eq!(parse_fhir_time("2019-07").map(|t| t.to_rfc3339()), Some("2019-07-01T00:00:00+00:00".to_owned()));
        assert!(parse_fhir_time("2019-13").is_none());
    }

    #[test]
    fn unshown_types_have_no_events() {
        assert!(extract_events(&tree!({"resourceType": "Claim"})).is_empty());
    }
}
