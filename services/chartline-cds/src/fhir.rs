//! The FHIR face of an output, after the HL7 AI Transparency approach: a `Composition`
//! tagged AIAST, a `Provenance` targeting it with the model as a `Device` agent, and as
//! entities the input resource versions, a model-card `DocumentReference` and the input
//! prompt as a `DocumentReference`.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

/// What the FHIR face is built from.
pub struct FhirInput<'a> {
    /// Output id (the Composition's id).
    pub output_id: &'a str,
    /// Patient id.
    pub patient_id: &'a str,
    /// The model's narrative.
    pub narrative: &'a str,
    /// `(key, title, loinc, text)` of the deterministic sections.
    pub sections: &'a [(String, String, String, String)],
    /// Verified citations of the narrative (`Type/id`).
    pub verified: &'a [String],
    /// Input resource versions `(type, id, version)`.
    pub inputs: &'a [(String, String, i64)],
    /// Model name, backend, weights sha256, tokenizer sha256.
    pub model: (&'a str, &'a str, &'a str, &'a str),
    /// The prompt text and its sha256.
    pub prompt: (&'a str, &'a str),
    /// Template version.
    pub template_version: &'a str,
    /// When generation finished.
    pub recorded: DateTime<Utc>,
    /// Who asked.
    pub requester: &'a str,
    /// Unsupported statements, for the Composition's note.
    pub unsupported: usize,
}

fn xhtml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn div(text: &str) -> String {
    let paras: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("<p>{}</p>", xhtml_escape(l))).collect();
    let body = if paras.is_empty() { "<p>(empty)</p>".to_owned() } else { paras.join("") };
    format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{body}</div>")
}

/// Device id for a model: stable per weights hash.
pub fn device_id(weights_sha256: &str) -> String {
    format!("model-{}", weights_sha256.get(..16).unwrap_or(weights_sha256))
}

/// All five resources, in write order: Device, model card, prompt, Composition, Provenance.
pub fn resources(i: &FhirInput<'_>) -> Vec<Value> {
    let (name, backend, weights, tokenizer) = i.model;
    let device = device_id(weights);
    let card_id = format!("model-card-{}", weights.get(..16).unwrap_or(weights));
    let prompt_id = format!("prompt-{}", i.output_id);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let recorded = i.recorded.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let aiast = json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST", "display": "Artificial Intelligence asserted"});

    let device_res = json!({
        "resourceType": "Device",
        "id": device,
        "status": "active",
        "deviceName": [{"name": name, "type": "model-name"}],
        "type": {"text": "AI language model"},
        "version": [{"type": {"text": "weights sha256"}, "value": weights}, {"type": {"text": "tokenizer sha256"}, "value": tokenizer}],
        "property": [{"type": {"text": "backend"}, "valueCode": [{"text": backend}]}],
    });
    let card = format!(
        "# Model card\n\nModel: {name}\nBackend: {backend}\nWeights sha256: {weights}\nTokenizer sha256: {tokenizer}\n\
         Use: drafting chart summaries for clinician review. Output is AI-generated, preliminary and must be verified against the cited sources.\n"
    );
    let card_res = json!({
        "resourceType": "DocumentReference",
        "id": card_id,
        "status": "current",
        "type": {"text": "AI model card"},
        "description": format!("Model card for {name}"),
        "content": [{"attachment": {"contentType": "text/markdown", "data": b64(&card), "title": "Model card"}}],
    });
    let prompt_res = json!({
        "resourceType": "DocumentReference",
        "id": prompt_id,
        "status": "current",
        "type": {"text": "AI input prompt"},
        "subject": {"reference": format!("Patient/{}", i.patient_id)},
        "identifier": [{"system": "urn:chartline:prompt-sha256", "value": i.prompt.1}],
        "description": format!("Input prompt, template {}", i.template_version),
        "meta": {"security": [aiast.clone()]},
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "data": b64(i.prompt.0), "title": "Input prompt"}}],
    });

    let mut sections = vec![json!({
        "title": "AI-generated summary",
        "code": {"text": "AI narrative summary"},
        "text": {"status": "generated", "div": div(i.narrative)},
        "entry": i.verified.iter().map(|r| json!({"reference": r})).collect::<Vec<_>>(),
    })];
    if i.verified.is_empty() {
        // FHIR forbids empty arrays; the section still has its text (cmp-1).
        if let Some(o) = sections[0].as_object_mut() {
            o.remove("entry");
        }
    }
    for (key, title, loinc, text) in i.sections {
        if text.is_empty() {
            continue;
        }
        let mut s = json!({"title": title, "text": {"status": "generated", "div": div(text)}});
        s["code"] = if loinc.is_empty() { json!({"text": key}) } else { json!({"coding": [{"system": "http://loinc.org", "code": loinc}], "text": title}) };
        sections.push(s);
    }
    let composition = json!({
        "resourceType": "Composition",
        "id": i.output_id,
        "meta": {"security": [aiast]},
        "status": "preliminary",
        "type": {"coding": [{"system": "http://loinc.org", "code": "60591-5", "display": "Patient summary Document"}]},
        "subject": {"reference": format!("Patient/{}", i.patient_id)},
        "date": recorded,
        "author": [{"reference": format!("Device/{device}")}],
        "title": "AI chart summary",
        "section": sections,
        "text": {"status": "generated", "div": div(&format!(
            "AI-generated chart summary ({name}); {} statement(s) without a verified citation. Review against the cited sources.",
            i.unsupported
        ))},
    });
    let mut entities: Vec<Value> = i
        .inputs
        .iter()
        .map(|(t, id, v)| json!({"role": "source", "what": {"reference": format!("{t}/{id}/_history/{v}")}}))
        .collect();
    entities.push(json!({"role": "source", "what": {"reference": format!("DocumentReference/{prompt_id}"), "display": "input prompt"}}));
    entities.push(json!({"role": "derivation", "what": {"reference": format!("DocumentReference/{card_id}"), "display": "model card"}}));
    let provenance = json!({
        "resourceType": "Provenance",
        "id": format!("prov-{}", i.output_id),
        "target": [{"reference": format!("Composition/{}", i.output_id)}],
        "recorded": recorded,
        "policy": ["urn:chartline:ai-provenance:v1"],
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]},
        "agent": [
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}]},
             "who": {"reference": format!("Device/{device}")}},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "enterer"}]},
             "who": {"display": i.requester}}
        ],
        "entity": entities,
    });
    vec![device_res, card_res, prompt_res, composition, provenance]
}
