//! `Summarize`: timeline prompt → model → citation check → output, provenance and FHIR face
//! stored in one transaction. Every hop is gRPC, also when all services share a process.

use std::collections::BTreeSet;
use std::time::Instant;

use chartline_proto::v1::inference_service_client::InferenceServiceClient;
use chartline_proto::v1::timeline_service_client::TimelineServiceClient;
use chartline_proto::v1::{
    BuildPromptRequest, ChatMessage, GenerateRequest, GenerationParameters, GetAttachmentRequest, Image, ModelIdentity,
    ModelInfoRequest, PromptImage, ResourceRef, generate_response,
};
use chartline_store::{LeasedJob, NewOutput, ProvenanceContent, ResourceWrite, Store, StoreError};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::citations;
use crate::fhir::{FhirInput, resources};

/// The task summaries are built for.
pub const TASK: &str = "chart_summary";
/// The IPS sections carried beside the narrative.
pub const STRUCTURED_SECTIONS: &[&str] = &["allergies", "problems", "medications", "results", "vital_signs"];

/// Summary settings.
#[derive(Debug, Clone)]
pub struct SummaryConfig {
    /// Prompt budget in tokens.
    pub token_budget: i32,
    /// Tokens the model may write.
    pub max_tokens: u32,
    /// Chart images attached to the prompt when the model takes images (a multimodal
    /// checkpoint such as MedGemma 4B); 0 sends none. Text-only models never get images.
    pub max_images: u32,
}

impl Default for SummaryConfig {
    fn default() -> Self {
        SummaryConfig { token_budget: 3000, max_tokens: 200, max_images: 1 }
    }
}

/// An image a summary prompt attached, as provenance records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedImage {
    /// The resource version holding the attachment.
    pub resource_type: String,
    /// Its id.
    pub id: String,
    /// Its version.
    pub version_id: i64,
    /// Which attachment of it.
    pub attachment_index: u32,
    /// The attachment's content type.
    pub content_type: String,
    /// sha256 of the image bytes (hex).
    pub sha256: String,
}

impl UsedImage {
    fn of(p: &PromptImage) -> Self {
        let src = p.source.clone().unwrap_or_default();
        UsedImage {
            resource_type: src.resource_type,
            id: src.id,
            version_id: src.version_id,
            attachment_index: p.attachment_index,
            content_type: p.content_type.clone(),
            sha256: p.sha256.clone(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "resource_type": self.resource_type,
            "id": self.id,
            "version_id": self.version_id,
            "attachment_index": self.attachment_index,
            "content_type": self.content_type,
            "sha256": self.sha256,
        })
    }

    fn from_json(v: &Value) -> Option<Self> {
        Some(UsedImage {
            resource_type: v.get("resource_type")?.as_str()?.to_owned(),
            id: v.get("id")?.as_str()?.to_owned(),
            version_id: v.get("version_id")?.as_i64()?,
            attachment_index: u32::try_from(v.get("attachment_index")?.as_u64()?).ok()?,
            content_type: v.get("content_type")?.as_str()?.to_owned(),
            sha256: v.get("sha256")?.as_str()?.to_owned(),
        })
    }
}

/// The images recorded in a provenance `parameters` object (none for text-only summaries).
pub fn images_from_json(parameters: &Value) -> Option<Vec<UsedImage>> {
    match parameters.get("images") {
        None => Some(Vec::new()),
        Some(v) => v.as_array()?.iter().map(UsedImage::from_json).collect(),
    }
}

/// Fetches the bytes of `images` at their recorded versions from the timeline service and
/// checks each against its recorded sha256 (a changed or missing image is
/// FAILED_PRECONDITION: the prompt could no longer be reproduced).
pub async fn fetch_images(timeline: &mut TimelineServiceClient<Channel>, images: &[UsedImage]) -> Result<Vec<Image>, tonic::Status> {
    let mut out = Vec::with_capacity(images.len());
    for img in images {
        let source = ResourceRef { resource_type: img.resource_type.clone(), id: img.id.clone(), version_id: img.version_id };
        let a = timeline
            .get_attachment(GetAttachmentRequest { source: Some(source), attachment_index: img.attachment_index })
            .await?
            .into_inner();
        // The bytes received, not the server's word for them.
        if hex::encode(Sha256::digest(&a.data)) != img.sha256 {
            return Err(tonic::Status::failed_precondition(format!(
                "image {}/{} attachment {} changed since the prompt was built",
                img.resource_type, img.id, img.attachment_index
            )));
        }
        out.push(Image {
            data: a.data,
            content_type: a.content_type,
            source: format!("{}/{}/_history/{}", img.resource_type, img.id, img.version_id),
        });
    }
    Ok(out)
}

/// Why a summary failed.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// No such patient.
    #[error("patient not found")]
    NotFound,
    /// A downstream service refused or is unavailable.
    #[error("{0}")]
    Upstream(tonic::Status),
    /// The database failed.
    #[error("storage failure")]
    Store(#[from] StoreError),
}

impl From<tonic::Status> for SummaryError {
    fn from(s: tonic::Status) -> Self {
        if s.code() == tonic::Code::NotFound { SummaryError::NotFound } else { SummaryError::Upstream(s) }
    }
}

impl From<SummaryError> for tonic::Status {
    fn from(e: SummaryError) -> Self {
        match e {
            SummaryError::NotFound => tonic::Status::not_found("patient not found"),
            SummaryError::Upstream(s) => s,
            SummaryError::Store(s) => {
                tracing::error!(error = %s, "storage failure in summary");
                tonic::Status::internal("storage failure")
            }
        }
    }
}

/// What a stored summary is, as `Summarize` returns it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Output id.
    pub output_id: Uuid,
    /// Chain position of its provenance row.
    pub chain_seq: i64,
}

/// Runs summaries.
#[derive(Clone)]
pub struct Summarizer {
    store: Store,
    timeline: TimelineServiceClient<Channel>,
    inference: InferenceServiceClient<Channel>,
    config: SummaryConfig,
}

/// The generation parameters summaries use: greedy, so replay reproduces them.
pub fn summary_parameters(config: &SummaryConfig) -> GenerationParameters {
    GenerationParameters { max_tokens: config.max_tokens, temperature: 0.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0, seed: 0, stop: vec![] }
}

/// Parameters as recorded in provenance (and read back for replay).
pub fn parameters_json(p: &GenerationParameters) -> Value {
    json!({
        "max_tokens": p.max_tokens,
        "temperature": p.temperature.to_string(),
        "top_p": p.top_p.to_string(),
        "top_k": p.top_k,
        "repetition_penalty": p.repetition_penalty.to_string(),
        "seed": p.seed.to_string(),
        "stop": p.stop,
        "chat_template": "gemma",
        "messages": [{"role": "user", "content": "<prompt_text>"}],
    })
}

/// The parameters back from their recorded form.
pub fn parameters_from_json(v: &Value) -> Option<GenerationParameters> {
    let f = |k: &str| v.get(k)?.as_str()?.parse::<f32>().ok();
    Some(GenerationParameters {
        max_tokens: u32::try_from(v.get("max_tokens")?.as_u64()?).ok()?,
        temperature: f("temperature")?,
        top_p: f("top_p")?,
        top_k: u32::try_from(v.get("top_k")?.as_u64()?).ok()?,
        repetition_penalty: f("repetition_penalty")?,
        seed: v.get("seed")?.as_str()?.parse().ok()?,
        stop: v.get("stop")?.as_array()?.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect(),
    })
}

/// Runs one generation over gRPC and collects the text; `images` go with the prompt's
/// `<start_of_image>` placeholders, in order.
pub async fn generate(
    inference: &mut InferenceServiceClient<Channel>,
    prompt_text: &str,
    parameters: GenerationParameters,
    images: Vec<Image>,
) -> Result<(String, String, ModelIdentity), tonic::Status> {
    let req = GenerateRequest {
        prompt: String::new(),
        messages: vec![ChatMessage { role: "user".into(), content: prompt_text.to_owned() }],
        parameters: Some(parameters),
        model: String::new(),
        images,
    };
    let mut stream = inference.generate(req).await?.into_inner();
    let mut text = String::new();
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(generate_response::Event::Token(t)) => text.push_str(&t.text),
            Some(generate_response::Event::Final(f)) => {
                let model = f.model.unwrap_or_default();
                // The final message carries the exact text (stop sequences removed).
                return Ok((f.text, f.finish_reason, model));
            }
            None => {}
        }
    }
    Err(tonic::Status::unavailable(format!("generation ended without a final message after {} bytes", text.len())))
}

fn to_write(resource: Value) -> ResourceWrite {
    let resource = chartline_fhir::Json::from(resource);
    ResourceWrite {
        resource_type: resource["resourceType"].as_str().unwrap_or_default().to_owned(),
        id: resource["id"].as_str().unwrap_or_default().to_owned(),
        canonical: chartline_fhir::CanonicalJson::of(&resource),
        patient_id: chartline_fhir::patient_of(&resource),
        events: chartline_fhir::extract_events(&resource),
        identifiers: Vec::new(),
    }
}

impl Summarizer {
    /// A summarizer calling the timeline and inference services over `timeline`/`inference`.
    pub fn new(store: Store, timeline: Channel, inference: Channel, config: SummaryConfig) -> Self {
        Summarizer {
            store,
            // Attachments (chart images) can exceed gRPC's default 4 MiB.
            timeline: TimelineServiceClient::new(timeline).max_decoding_message_size(256 << 20),
            inference: InferenceServiceClient::new(inference).max_decoding_message_size(64 << 20),
            config,
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// An inference client (for replay).
    pub fn inference(&self) -> InferenceServiceClient<Channel> {
        self.inference.clone()
    }

    /// Summarizes a patient's chart and stores the result (completing `job` if given).
    #[tracing::instrument(skip_all, fields(patient_id = %patient_id))]
    pub async fn summarize(&self, patient_id: &str, requester: &str, job: Option<&LeasedJob>) -> Result<Stored, SummaryError> {
        let data_as_of = self.store.patient_data_as_of(patient_id).await?;
        let now = Utc::now();
        // Images go only to a model that takes them, each costing its soft tokens plus the
        // wrapper (the timeline's default when the model does not say).
        let info = self.inference.clone().model_info(ModelInfoRequest {}).await?.into_inner();
        let max_images = if info.accepts_images { self.config.max_images } else { 0 };
        // Soft tokens plus `<start_of_image>`, `<end_of_image>` and the two blank-line
        // tokens around them (Gemma 3's expansion).
        let image_tokens = if info.tokens_per_image > 0 { info.tokens_per_image + 4 } else { 0 };
        let build = |max_images: u32| {
            let mut timeline = self.timeline.clone();
            let request = BuildPromptRequest {
                patient_id: patient_id.to_owned(),
                task: TASK.to_owned(),
                token_budget: self.config.token_budget,
                as_of: Some(prost_types::Timestamp { seconds: now.timestamp(), nanos: 0 }),
                max_images,
                image_tokens,
            };
            async move { timeline.build_prompt(request).await.map(tonic::Response::into_inner) }
        };
        let mut prompt = build(max_images).await?;
        let mut used_images: Vec<UsedImage> = prompt.images.iter().map(UsedImage::of).collect();

        // The structured sections shown beside the narrative are not cut to the model's
        // budget: a clinician sees every active problem, medication and allergy.
        let full = self
            .timeline
            .clone()
            .build_prompt(BuildPromptRequest {
                patient_id: patient_id.to_owned(),
                task: TASK.to_owned(),
                token_budget: 1_000_000,
                as_of: Some(prost_types::Timestamp { seconds: now.timestamp(), nanos: 0 }),
                ..Default::default()
            })
            .await?
            .into_inner();
        let params = summary_parameters(&self.config);
        let mut started_at = Utc::now();
        let mut clock = Instant::now();
        let mut generated = match fetch_images(&mut self.timeline.clone(), &used_images).await {
            Ok(images) => generate(&mut self.inference.clone(), &prompt.prompt, params.clone(), images).await,
            Err(e) => Err(e),
        };
        // A chart image the model cannot read (a corrupt file, an unsupported DICOM transfer
        // syntax) or that vanished must not block the patient's summaries: summarize the text
        // without images and say so in the log (ids and counts only).
        if let Err(e) = &generated
            && !used_images.is_empty()
            && matches!(e.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted)
        {
            tracing::warn!(code = ?e.code(), images = used_images.len(), "chart images refused; summarizing without images");
            prompt = build(0).await?;
            used_images.clear();
            started_at = Utc::now();
            clock = Instant::now();
            generated = generate(&mut self.inference.clone(), &prompt.prompt, params.clone(), Vec::new()).await;
        }
        let (narrative, finish_reason, model) = generated?;
        let latency_ms = clock.elapsed().as_millis() as i64;
        let finished_at = Utc::now();

        let cited: BTreeSet<String> = prompt.citations.iter().map(|c| format!("{}/{}", c.resource_type, c.id)).collect();
        let report = citations::check(&narrative, &cited);
        let verified: Vec<String> = {
            let mut v: Vec<String> = report.statements.iter().flat_map(|s| s.citations.iter().filter(|c| cited.contains(*c)).cloned()).collect();
            v.sort();
            v.dedup();
            v
        };
        let sections: Vec<(String, String, String, String)> = full
            .sections
            .iter()
            .filter(|s| STRUCTURED_SECTIONS.contains(&s.key.as_str()))
            .map(|s| (s.key.clone(), s.title.clone(), s.loinc.clone(), s.text.clone()))
            .collect();
        let inputs: Vec<(String, String, i64)> =
            prompt.citations.iter().map(|c| (c.resource_type.clone(), c.id.clone(), c.version_id)).collect();
        let output_id = Uuid::new_v4();
        let output_sha256 = hex::encode(Sha256::digest(narrative.as_bytes()));
        let provenance = ProvenanceContent {
            model_name: model.name.clone(),
            backend: model.backend.clone(),
            weights_sha256: model.weights_sha256.clone(),
            tokenizer_sha256: model.tokenizer_sha256.clone(),
            template_version: prompt.template_version.clone(),
            prompt_sha256: prompt.prompt_sha256.clone(),
            prompt_text: prompt.prompt.clone(),
            inputs: json!(inputs.iter().map(|(t, i, v)| json!({"resource_type": t, "id": i, "version_id": v})).collect::<Vec<_>>()),
            parameters: {
                let mut p = parameters_json(&params);
                if !used_images.is_empty() {
                    p["images"] = json!(used_images.iter().map(UsedImage::to_json).collect::<Vec<_>>());
                }
                p
            },
            requester: requester.to_owned(),
            started_at,
            finished_at,
            latency_ms,
            output_sha256,
        };
        let output = NewOutput {
            id: output_id,
            patient_id: patient_id.to_owned(),
            task: TASK.to_owned(),
            narrative: narrative.clone(),
            sections: json!(sections.iter().map(|(k, t, l, x)| json!({"key": k, "title": t, "loinc": l, "text": x})).collect::<Vec<_>>()),
            statements: serde_json::to_value(&report.statements).unwrap_or(Value::Null),
            citations_found: report.found as i32,
            citations_verified: report.verified as i32,
            unsupported_statements: report.unsupported as i32,
            finish_reason,
            data_as_of,
        };
        let fhir = resources(&FhirInput {
            output_id: &output_id.to_string(),
            patient_id,
            narrative: &narrative,
            sections: &sections,
            verified: &verified,
            inputs: &inputs,
            model: (&model.name, &model.backend, &model.weights_sha256, &model.tokenizer_sha256),
            prompt: (&prompt.prompt, &prompt.prompt_sha256),
            template_version: &prompt.template_version,
            recorded: finished_at,
            requester,
            unsupported: report.unsupported,
        });
        let chain_seq = self.store.store_output(&output, &provenance, fhir.into_iter().map(to_write).collect(), job).await?;
        tracing::info!(
            %output_id,
            chain_seq,
            latency_ms,
            images = used_images.len(),
            citations_found = report.found,
            citations_verified = report.verified,
            unsupported = report.unsupported,
            "summary stored"
        );
        Ok(Stored { output_id, chain_seq })
    }
}
