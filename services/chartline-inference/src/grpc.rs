//! The gRPC face: `chartline.v1.InferenceService`. The server answers `UNAVAILABLE` (and
//! health says `NOT_SERVING`) until the model is loaded; wire types become validated
//! [`GenerateParams`] once, here, and every error names the field.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use chartline_proto::v1 as pb;
use chartline_proto::v1::inference_service_server::{InferenceService, InferenceServiceServer};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    ChatMessage, Embedder, Engine, Error, ErrorCategory, GenerateParams, GenerationEvent,
    ImageInput, ImageTextEmbedder, MAX_LABELS, ModelIdentity, Role, chat_prompt,
};

/// Most images one `Generate` or `EmbedImage` call may carry.
pub const MAX_IMAGES: usize = 16;

/// Wire images to engine inputs; errors name `images[i]`.
fn images_of(images: Vec<pb::Image>, field: &str) -> Result<Vec<ImageInput>, Status> {
    if images.len() > MAX_IMAGES {
        return Err(Status::invalid_argument(format!(
            "{field} holds {} images; at most {MAX_IMAGES}",
            images.len()
        )));
    }
    images
        .into_iter()
        .enumerate()
        .map(|(i, img)| {
            if img.data.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{field}[{i}].data is empty"
                )));
            }
            Ok(ImageInput {
                data: img.data.into(),
                content_type: (!img.content_type.is_empty()).then_some(img.content_type),
                source: (!img.source.is_empty()).then_some(img.source),
            })
        })
        .collect()
}

/// Most texts one `Embed` call may carry.
pub const MAX_EMBED_TEXTS: usize = 256;
/// Longest text `Embed`, `Tokenize` or `CountTokens` accepts, in bytes.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e.category() {
            ErrorCategory::InvalidArgument => Status::invalid_argument(msg),
            ErrorCategory::NotFound => Status::not_found(msg),
            ErrorCategory::Unavailable => Status::unavailable(msg),
            ErrorCategory::Internal => {
                tracing::error!(error = %msg, "inference failure");
                Status::internal("inference failure")
            }
        }
    }
}

/// The models behind the service, filled in when loading finishes.
#[derive(Clone, Default)]
pub struct Models {
    engine: Arc<OnceLock<Engine>>,
    embedder: Arc<OnceLock<Embedder>>,
    image_text: Arc<OnceLock<ImageTextEmbedder>>,
}

impl Models {
    /// Empty: every call answers UNAVAILABLE until [`Models::set_engine`].
    pub fn new() -> Self {
        Models::default()
    }

    /// Installs the generation engine (once).
    pub fn set_engine(&self, engine: Engine) {
        let _ = self.engine.set(engine);
    }

    /// Installs the embedder (once).
    pub fn set_embedder(&self, embedder: Embedder) {
        let _ = self.embedder.set(embedder);
    }

    /// Installs the image-text model (MedSigLIP) (once).
    pub fn set_image_text(&self, model: ImageTextEmbedder) {
        let _ = self.image_text.set(model);
    }

    fn image_text_or_unavailable(&self) -> Result<&ImageTextEmbedder, Status> {
        self.image_text.get().ok_or_else(|| {
            Status::unavailable("no image-text model is loaded (start with --image-model)")
        })
    }

    /// The engine, if loaded.
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.get()
    }

    fn engine_or_unavailable(&self) -> Result<&Engine, Status> {
        self.engine
            .get()
            .ok_or_else(|| Status::unavailable("the model is still loading"))
    }
}

/// `InferenceService` over [`Models`].
#[derive(Clone)]
pub struct InferenceGrpc {
    models: Models,
}

/// The tonic server for `InferenceService`.
pub fn server(models: Models) -> InferenceServiceServer<InferenceGrpc> {
    InferenceServiceServer::new(InferenceGrpc { models })
        // Images travel in requests: a chest radiograph DICOM can be tens of megabytes.
        .max_decoding_message_size(128 << 20)
        .max_encoding_message_size(64 << 20)
}

/// The wire form of a model identity.
pub fn identity(m: &ModelIdentity) -> pb::ModelIdentity {
    pb::ModelIdentity {
        name: m.name.clone(),
        backend: m.backend.as_str().to_owned(),
        weights_sha256: m.weights_sha256.clone(),
        tokenizer_sha256: m.tokenizer_sha256.clone(),
        context_length: u32::try_from(m.context_length).unwrap_or(u32::MAX),
    }
}

fn role(r: &str, i: usize) -> Result<Role, Status> {
    match r {
        "system" => Ok(Role::System),
        "user" => Ok(Role::User),
        "model" | "assistant" => Ok(Role::Assistant),
        _ => Err(Status::invalid_argument(format!(
            "messages[{i}].role must be system, user or model"
        ))),
    }
}

/// The prompt text a request asks for: a raw prompt, or messages through the chat template.
fn prompt_of(req: &pb::GenerateRequest) -> Result<String, Status> {
    match (req.prompt.is_empty(), req.messages.is_empty()) {
        (false, false) => Err(Status::invalid_argument(
            "give either prompt or messages, not both",
        )),
        (true, true) => Err(Status::invalid_argument(
            "prompt must not be empty (or give messages)",
        )),
        (false, true) => Ok(req.prompt.clone()),
        (true, false) => {
            let messages = req
                .messages
                .iter()
                .enumerate()
                .map(|(i, m)| Ok(ChatMessage::new(role(&m.role, i)?, m.content.clone())))
                .collect::<Result<Vec<_>, Status>>()?;
            Ok(chat_prompt(&messages)?)
        }
    }
}

/// Wire parameters to validated ones. Absent parameters mean greedy with the defaults;
/// 0 for top_p and repetition_penalty means "off" (1).
fn params_of(p: Option<&pb::GenerationParameters>) -> Result<GenerateParams, Status> {
    let params = match p {
        None => GenerateParams::default(),
        Some(p) => GenerateParams {
            max_tokens: p.max_tokens,
            temperature: p.temperature,
            top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
            top_k: p.top_k,
            repetition_penalty: if p.repetition_penalty == 0.0 {
                1.0
            } else {
                p.repetition_penalty
            },
            seed: Some(p.seed),
            stop: p.stop.clone(),
        },
    };
    params.validate()?;
    Ok(params)
}

fn embed_response(vectors: Vec<Vec<f32>>, model: String, dimension: usize) -> pb::EmbedResponse {
    pb::EmbedResponse {
        dimensions: u32::try_from(dimension).unwrap_or(u32::MAX),
        model,
        embeddings: vectors
            .into_iter()
            .map(|values| pb::Embedding { values })
            .collect(),
    }
}

type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send + 'static>>;

impl InferenceGrpc {
    /// Token ids of a request's text by the served model's tokenizer.
    fn encode(&self, req: &pb::TokenizeRequest) -> Result<Vec<u32>, Status> {
        if req.text.len() > MAX_TEXT_BYTES {
            return Err(Status::invalid_argument(format!(
                "text must be at most {MAX_TEXT_BYTES} bytes"
            )));
        }
        let tok = self
            .models
            .engine_or_unavailable()?
            .tokenizer()
            .ok_or_else(|| Status::unimplemented("this backend has no local tokenizer"))?;
        Ok(tok.encode(&req.text, req.add_bos)?)
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceGrpc {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let engine = self.models.engine_or_unavailable()?;
        let mut req = request.into_inner();
        let served = &engine.identity().name;
        if !req.model.is_empty()
            && req.model != *served
            && req.model != engine.identity().weights_sha256
        {
            return Err(Status::invalid_argument(format!(
                "model: unknown model {:?}; this server serves {served:?}",
                req.model
            )));
        }
        let params = params_of(req.parameters.as_ref())?;
        let prompt = prompt_of(&req)?;
        let images = images_of(std::mem::take(&mut req.images), "images")?;
        if !images.is_empty() && engine.image_support().is_none() {
            return Err(Status::invalid_argument(format!(
                "images: model {served:?} is text-only and does not take images"
            )));
        }
        // Chat messages travel as messages (a remote engine applies its own template); a
        // raw prompt goes as text.
        let events = if req.messages.is_empty() {
            engine.generate_with_images(prompt, images, params)
        } else {
            let messages = req
                .messages
                .iter()
                .enumerate()
                .map(|(i, m)| Ok(ChatMessage::new(role(&m.role, i)?, m.content.clone())))
                .collect::<Result<Vec<_>, Status>>()?;
            engine.generate_chat_with_images(messages, images, params)
        };
        // Dropping this stream (the client went away) drops the engine's stream, which stops
        // generation at the next token.
        let mut text = String::new();
        let out = events.map(move |ev| match ev {
            Ok(GenerationEvent::Token(t)) => {
                text.push_str(&t.text);
                Ok(pb::GenerateResponse {
                    event: Some(pb::generate_response::Event::Token(pb::Token {
                        id: t.id,
                        text: t.text,
                    })),
                })
            }
            Ok(GenerationEvent::Finished(c)) => Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Final(pb::Final {
                    usage: Some(pb::Usage {
                        prompt_tokens: u32::try_from(c.usage.prompt_tokens).unwrap_or(u32::MAX),
                        completion_tokens: u32::try_from(c.usage.completion_tokens)
                            .unwrap_or(u32::MAX),
                    }),
                    finish_reason: c.finish_reason.as_str().to_owned(),
                    model: Some(identity(&c.model)),
                    text: std::mem::take(&mut text),
                })),
            }),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        Ok(Response::new(pb::TokenizeResponse {
            ids: self.encode(&request.into_inner())?,
        }))
    }

    async fn count_tokens(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        let n = self.encode(&request.into_inner())?.len();
        Ok(Response::new(pb::CountTokensResponse {
            count: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let req = request.into_inner();
        let space = pb::EmbeddingSpace::try_from(req.space)
            .map_err(|_| Status::invalid_argument(format!("space: unknown value {}", req.space)))?;
        if req.texts.is_empty() {
            return Err(Status::invalid_argument("texts must not be empty"));
        }
        if req.texts.len() > MAX_EMBED_TEXTS {
            return Err(Status::invalid_argument(format!(
                "texts must hold at most {MAX_EMBED_TEXTS} entries"
            )));
        }
        if let Some(i) = req
            .texts
            .iter()
            .position(|t| t.trim().is_empty() || t.len() > MAX_TEXT_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "texts[{i}] must be non-empty and at most {MAX_TEXT_BYTES} bytes"
            )));
        }
        let (vectors, name, dimension) = match space {
            pb::EmbeddingSpace::Text => {
                let embedder = self
                    .models
                    .embedder
                    .get()
                    .ok_or_else(|| Status::unavailable("no embedding model is loaded"))?;
                (
                    embedder.embed(req.texts).await?,
                    embedder.identity().name.clone(),
                    embedder.dimension(),
                )
            }
            pb::EmbeddingSpace::ImageText => {
                let model = self.models.image_text_or_unavailable()?;
                (
                    model.embed_texts(req.texts).await?,
                    model.identity().name.clone(),
                    model.dimension(),
                )
            }
        };
        Ok(Response::new(embed_response(vectors, name, dimension)))
    }

    async fn embed_image(
        &self,
        request: Request<pb::EmbedImageRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let model = self.models.image_text_or_unavailable()?;
        let images = images_of(request.into_inner().images, "images")?;
        if images.is_empty() {
            return Err(Status::invalid_argument("images must not be empty"));
        }
        let vectors = model.embed_images(images).await?;
        Ok(Response::new(embed_response(
            vectors,
            model.identity().name.clone(),
            model.dimension(),
        )))
    }

    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let model = self.models.image_text_or_unavailable()?;
        let req = request.into_inner();
        let image = req
            .image
            .ok_or_else(|| Status::invalid_argument("image is required"))?;
        let mut images = images_of(vec![image], "image")?;
        let image = images.remove(0);
        if req.labels.len() > MAX_LABELS {
            return Err(Status::invalid_argument(format!(
                "labels holds {} entries; at most {MAX_LABELS}",
                req.labels.len()
            )));
        }
        if let Some(i) = req.labels.iter().position(|t| t.len() > MAX_TEXT_BYTES) {
            return Err(Status::invalid_argument(format!(
                "labels[{i}] must be at most {MAX_TEXT_BYTES} bytes"
            )));
        }
        let scores = model.classify(image, req.labels).await?;
        Ok(Response::new(pb::ClassifyResponse {
            model: model.identity().name.clone(),
            scores: scores
                .into_iter()
                .map(|s| pb::LabelScore {
                    label: s.label,
                    probability: s.probability,
                    logit: s.logit,
                })
                .collect(),
        }))
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let engine = self.models.engine_or_unavailable()?;
        let emb = self.models.embedder.get();
        let image_text = self.models.image_text.get();
        let images = engine.image_support();
        Ok(Response::new(pb::ModelInfoResponse {
            model: Some(identity(engine.identity())),
            embedding_model: emb.map(|e| e.identity().name.clone()).unwrap_or_default(),
            embedding_dimensions: emb.map_or(0, |e| u32::try_from(e.dimension()).unwrap_or(0)),
            accepts_images: images.is_some(),
            tokens_per_image: images
                .map_or(0, |s| u32::try_from(s.tokens_per_image).unwrap_or(u32::MAX)),
            image_model: image_text.map(|m| identity(m.identity())),
            image_embedding_dimensions: image_text
                .map_or(0, |m| u32::try_from(m.dimension()).unwrap_or(0)),
        }))
    }
}
