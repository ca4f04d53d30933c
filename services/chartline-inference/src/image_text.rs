//! Image–text embeddings and zero-shot classification with a SigLIP dual encoder
//! (MedSigLIP, `google/medsiglip-448`): images and texts land in one space, compared by
//! cosine similarity; a label's probability is SigLIP's sigmoid of
//! `cos(image, text) · exp(logit_scale) + logit_bias`, each label on its own (the
//! probabilities of several labels need not sum to 1: SigLIP is trained with a pairwise
//! sigmoid loss, not a softmax over labels).
//!
//! Loads a Hugging Face folder: `config.json` (`model_type` `siglip`, `vision_config`,
//! `text_config`), `model.safetensors` (or shards with an index), `tokenizer.json` and
//! `preprocessor_config.json`. Texts are tokenized, truncated and padded to the text
//! tower's `max_position_embeddings` (64) with the pad token, as SigLIP's processor does with
//! `padding="max_length"`. The model runs on its own thread like the other engines.

use std::path::Path;
use std::sync::mpsc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};
use tokio::sync::oneshot;

use crate::backend::ImageInput;
use crate::error::{Error, Result};
use crate::gemma3::{Checkpoint, Keys, sha256_of_files, siglip_vision_config};
use crate::identity::{BackendKind, ModelIdentity};
use crate::images::ImagePreprocessor;
use crate::siglip::{
    SiglipText, SiglipTextConfig, SiglipTowerConfig, SiglipVision, WeightSource as _, l2_normalize,
};

/// Most labels one classification may carry.
pub const MAX_LABELS: usize = 64;
/// Images per forward pass.
const IMAGE_BATCH: usize = 4;
/// Texts per forward pass.
const TEXT_BATCH: usize = 32;

/// A label's score from [`ImageTextEmbedder::classify`].
#[derive(Clone, Debug, PartialEq)]
pub struct LabelScore {
    /// The label as given.
    pub label: String,
    /// `sigmoid(logit)`.
    pub probability: f32,
    /// `cos(image, label) · exp(logit_scale) + logit_bias`.
    pub logit: f32,
}

enum Job {
    Images(Vec<ImageInput>, oneshot::Sender<Result<Vec<Vec<f32>>>>),
    Texts(Vec<String>, oneshot::Sender<Result<Vec<Vec<f32>>>>),
    Classify(
        ImageInput,
        Vec<String>,
        oneshot::Sender<Result<Vec<LabelScore>>>,
    ),
}

/// A SigLIP dual encoder on its own thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ImageTextEmbedder {
    jobs: mpsc::Sender<Job>,
    identity: ModelIdentity,
    dimension: usize,
}

impl ImageTextEmbedder {
    /// Loads a SigLIP folder (f32 weights on CPU) and starts its thread. Blocking.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let model = SiglipDualEncoder::load(dir.as_ref(), DType::F32, &Device::Cpu)?;
        let identity = model.identity.clone();
        let dimension = model.dimension();
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("image-text-{}", identity.name))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let caught = |f: &mut dyn FnMut() -> Result<()>| {
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                            tracing::error!("the image-text model panicked");
                        }
                    };
                    match job {
                        Job::Images(images, reply) => {
                            let mut reply = Some(reply);
                            caught(&mut || {
                                let r = model.embed_images(&images);
                                if let Some(tx) = reply.take() {
                                    let _ = tx.send(r);
                                }
                                Ok(())
                            });
                        }
                        Job::Texts(texts, reply) => {
                            let mut reply = Some(reply);
                            caught(&mut || {
                                let r = model.embed_texts(&texts);
                                if let Some(tx) = reply.take() {
                                    let _ = tx.send(r);
                                }
                                Ok(())
                            });
                        }
                        Job::Classify(image, labels, reply) => {
                            let mut reply = Some(reply);
                            caught(&mut || {
                                let r = model.classify(&image, &labels);
                                if let Some(tx) = reply.take() {
                                    let _ = tx.send(r);
                                }
                                Ok(())
                            });
                        }
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the image-text thread: {e}")))?;
        Ok(ImageTextEmbedder {
            jobs,
            identity,
            dimension,
        })
    }

    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<Result<T>>) -> Job) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(job(tx))
            .map_err(|_| Error::Unavailable("the image-text thread has stopped".into()))?;
        rx.await.map_err(|_| {
            Error::Unavailable("the image-text thread dropped the request (it panicked)".into())
        })?
    }

    /// L2-normalized image embeddings, in order.
    pub async fn embed_images(&self, images: Vec<ImageInput>) -> Result<Vec<Vec<f32>>> {
        if images.is_empty() {
            return Err(Error::invalid("images", "must not be empty"));
        }
        self.ask(|tx| Job::Images(images, tx)).await
    }

    /// L2-normalized text embeddings in the image space, in order.
    pub async fn embed_texts(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Err(Error::invalid("texts", "must not be empty"));
        }
        self.ask(|tx| Job::Texts(texts, tx)).await
    }

    /// Zero-shot scores of `image` for each label, in the labels' order.
    pub async fn classify(
        &self,
        image: ImageInput,
        labels: Vec<String>,
    ) -> Result<Vec<LabelScore>> {
        check_labels(&labels)?;
        self.ask(|tx| Job::Classify(image, labels, tx)).await
    }

    /// The model's identity.
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// Length of each embedding.
    pub fn dimension(&self) -> usize {
        self.dimension
    }
}

fn check_labels(labels: &[String]) -> Result<()> {
    if labels.is_empty() {
        return Err(Error::invalid("labels", "must not be empty"));
    }
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid(
            "labels",
            format!("{} labels; at most {MAX_LABELS}", labels.len()),
        ));
    }
    if let Some(i) = labels.iter().position(|l| l.trim().is_empty()) {
        return Err(Error::invalid(format!("labels[{i}]"), "must not be blank"));
    }
    Ok(())
}

/// The SigLIP dual encoder, used on one thread.
pub struct SiglipDualEncoder {
    vision: SiglipVision,
    text: SiglipText,
    tokenizer: tokenizers::Tokenizer,
    preprocessor: ImagePreprocessor,
    logit_scale: f32,
    logit_bias: f32,
    device: Device,
    identity: ModelIdentity,
}

impl SiglipDualEncoder {
    /// Loads a SigLIP checkpoint folder with weights as `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound(dir.to_path_buf()));
        }
        let config_path = dir.join("config.json");
        let root: Value = {
            let bytes = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::InvalidModel(format!("{}: {e}", config_path.display())))?
        };
        let obj = root.as_object().ok_or_else(|| {
            Error::InvalidModel(format!("{} is not a JSON object", config_path.display()))
        })?;
        let top = Keys::new(obj, "", &config_path);
        if let Some(t) = top.opt_str("model_type")?
            && t != "siglip"
        {
            return Err(top.err("model_type", format!("is {t:?}; this loader reads siglip")));
        }
        let sub = |key: &'static str, prefix: &'static str| -> Result<Keys<'_>> {
            match obj.get(key) {
                Some(Value::Object(o)) => Ok(Keys::new(o, prefix, &config_path)),
                _ => Err(top.err(key, "is required (an object)")),
            }
        };
        let vk = sub("vision_config", "vision_config.")?;
        let vision_cfg = siglip_vision_config(&vk)?;
        if !vision_cfg.use_head {
            return Err(vk.err(
                "vision_use_head",
                "is false; a dual encoder needs the pooling head",
            ));
        }
        let tk = sub("text_config", "text_config.")?;
        let hidden = tk.required_usize("hidden_size")?;
        let text_cfg = SiglipTextConfig {
            tower: SiglipTowerConfig {
                hidden_size: hidden,
                intermediate_size: tk.required_usize("intermediate_size")?,
                num_layers: tk.required_usize("num_hidden_layers")?,
                num_heads: tk.required_usize("num_attention_heads")?,
                layer_norm_eps: tk.positive_f64_or("layer_norm_eps", 1e-6)?,
            },
            vocab_size: tk.required_usize("vocab_size")?,
            max_positions: tk.usize_or("max_position_embeddings", 64)?,
            projection_size: tk.usize_or("projection_size", hidden)?,
            pad_token_id: u32::try_from(tk.usize_or("pad_token_id", 1)?)
                .map_err(|_| tk.err("pad_token_id", "is out of range"))?,
        };
        if text_cfg.projection_size != vision_cfg.tower.hidden_size {
            return Err(tk.err(
                "projection_size",
                format!(
                    "({}) must equal vision_config.hidden_size ({}) to share one space",
                    text_cfg.projection_size, vision_cfg.tower.hidden_size
                ),
            ));
        }

        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_bytes =
            std::fs::read(&tokenizer_path).map_err(|e| Error::io(&tokenizer_path, e))?;
        let mut tokenizer =
            tokenizers::Tokenizer::from_bytes(&tokenizer_bytes).map_err(Error::tokenizer)?;
        let pad_token = tokenizer
            .id_to_token(text_cfg.pad_token_id)
            .ok_or_else(|| {
                tk.err(
                    "pad_token_id",
                    format!(
                        "({}) is not a token of tokenizer.json",
                        text_cfg.pad_token_id
                    ),
                )
            })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: text_cfg.max_positions,
                ..Default::default()
            }))
            .map_err(Error::tokenizer)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(text_cfg.max_positions),
            pad_id: text_cfg.pad_token_id,
            pad_token,
            ..Default::default()
        }));

        let preprocessor = ImagePreprocessor::from_file(&dir.join("preprocessor_config.json"))?;
        if preprocessor.size() != (vision_cfg.image_size, vision_cfg.image_size) {
            return Err(Error::InvalidModel(format!(
                "preprocessor_config.json resizes to {:?} but vision_config.image_size is {}",
                preprocessor.size(),
                vision_cfg.image_size
            )));
        }

        let mut checkpoint = Checkpoint::open(dir)?;
        let files = checkpoint.files();
        let mut src = (&mut checkpoint, device);
        let vision = SiglipVision::load(&mut src, "vision_model", &vision_cfg, dtype)?;
        let text = SiglipText::load(&mut src, "text_model", &text_cfg, dtype)?;
        let scalar = |src: &mut (&mut Checkpoint, &Device), name: &str| -> Result<f32> {
            let t = src.tensor(name, &[1], DType::F32)?;
            Ok(t.to_vec1::<f32>()?[0])
        };
        let logit_scale = scalar(&mut src, "logit_scale")?;
        let logit_bias = scalar(&mut src, "logit_bias")?;

        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "siglip".to_owned());
        let identity = ModelIdentity {
            name,
            backend: BackendKind::Safetensors,
            weights_sha256: sha256_of_files(&files)?,
            tokenizer_sha256: hex::encode(Sha256::digest(&tokenizer_bytes)),
            context_length: text_cfg.max_positions,
        };
        tracing::info!(model = %identity.name, "loaded image-text model");
        Ok(SiglipDualEncoder {
            vision,
            text,
            tokenizer,
            preprocessor,
            logit_scale,
            logit_bias,
            device: device.clone(),
            identity,
        })
    }

    /// Length of each embedding.
    pub fn dimension(&self) -> usize {
        self.vision.config().tower.hidden_size
    }

    /// The model's identity.
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// `exp(logit_scale)` and `logit_bias`.
    pub fn logit_scale_and_bias(&self) -> (f32, f32) {
        (self.logit_scale.exp(), self.logit_bias)
    }

    /// Token ids of `text` as the text tower reads them (padded to its length) and the
    /// attention mask (1 token, 0 padding).
    pub fn text_ids(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(Error::tokenizer)?;
        Ok((enc.get_ids().to_vec(), enc.get_attention_mask().to_vec()))
    }

    fn image_tensor(&self, images: &[ImageInput], offset: usize) -> Result<Tensor> {
        let pixels = images
            .iter()
            .enumerate()
            .map(|(i, img)| self.preprocessor.pixels(img, offset + i, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&pixels, 0)?)
    }

    /// Normalized pixels (B, 3, S, S) → unnormalized pooled embeddings (B, d).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.pooled(pixels)?)
    }

    /// Token ids (B, L) and attention mask (B, L) → unnormalized text embeddings (B, d).
    pub fn text_features(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.text.forward(ids, mask)?)
    }

    /// L2-normalized embeddings of images.
    pub fn embed_images(&self, images: &[ImageInput]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for (b, batch) in images.chunks(IMAGE_BATCH).enumerate() {
            let pixels = self.image_tensor(batch, b * IMAGE_BATCH)?;
            let e = l2_normalize(&self.image_features(&pixels)?)?;
            out.extend(e.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// L2-normalized text embeddings in the image space.
    pub fn embed_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(TEXT_BATCH) {
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            for t in batch {
                let (i, m) = self.text_ids(t)?;
                ids.extend(i);
                mask.extend(m);
            }
            let l = self.text.config().max_positions;
            let ids = Tensor::from_vec(ids, (batch.len(), l), &self.device)?;
            let mask = Tensor::from_vec(mask, (batch.len(), l), &self.device)?;
            let e = l2_normalize(&self.text_features(&ids, Some(&mask))?)?;
            out.extend(e.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// Zero-shot scores of one image for each label.
    pub fn classify(&self, image: &ImageInput, labels: &[String]) -> Result<Vec<LabelScore>> {
        check_labels(labels)?;
        let img = self.embed_images(std::slice::from_ref(image))?;
        let texts = self.embed_texts(labels)?;
        let (scale, bias) = self.logit_scale_and_bias();
        Ok(labels
            .iter()
            .zip(texts)
            .map(|(label, t)| {
                let cos: f32 = img[0].iter().zip(&t).map(|(a, b)| a * b).sum();
                let logit = cos * scale + bias;
                LabelScore {
                    label: label.clone(),
                    probability: 1.0 / (1.0 + (-logit).exp()),
                    logit,
                }
            })
            .collect())
    }
}
