//! Gemma 3 multimodal (`Gemma3ForConditionalGeneration`: MedGemma 4B and 27B): the SigLIP
//! vision tower, the multi-modal projector, and prefill with image soft tokens.
//!
//! An image becomes `mm_tokens_per_image` (256) soft tokens:
//!
//! ```text
//! pixels (1, 3, 896, 896)
//!   → SigLIP tower, post_layernorm           (1, 4096, 1152)   64×64 patches of 14 px
//!   → transpose, reshape to the patch grid   (1, 1152, 64, 64)
//!   → average pool 4×4 (stride 4)            (1, 1152, 16, 16)
//!   → flatten, transpose                     (1, 256, 1152)
//!   → mm_soft_emb_norm (Gemma RMSNorm, 1 + w)
//!   → @ mm_input_projection_weight           (1, 256, hidden)
//! ```
//!
//! The prompt carries one `<start_of_image>` per image; as Gemma 3's processor does, each
//! is expanded to `"\n\n<start_of_image>" + "<image_soft_token>" × 256 + "<end_of_image>\n\n"`
//! before tokenizing, and the soft tokens' embeddings are replaced by the image features
//! (which, unlike text embeddings, are not multiplied by `sqrt(hidden)`). Attention is
//! bidirectional among the soft tokens of one image (on sliding-window and global layers
//! alike) and causal everywhere else. Prefill chunks never split an image, so each image's
//! block is computed in one pass.

use candle_core::{DType, Tensor};

use crate::backend::{ImageInput, TokenSink};
use crate::error::{Error, Result};
use crate::images::ImagePreprocessor;
use crate::siglip::SiglipVision;

use super::model::Gemma3;

/// How a multimodal model wants images in its prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSupport {
    /// What marks an image's place in the prompt text (`<start_of_image>`).
    pub placeholder: String,
    /// What each placeholder is expanded to before tokenizing.
    pub expansion: String,
    /// Id of the soft token (`<image_soft_token>`).
    pub image_token_id: u32,
    /// The soft token's and the end-of-image token's text: a prompt must not spell them
    /// (only expansions of the placeholder may hold them).
    pub reserved: Vec<String>,
    /// Soft tokens per image (256 for MedGemma).
    pub tokens_per_image: usize,
    /// Side of the square image the tower takes (896 for MedGemma).
    pub image_size: usize,
}

/// `multi_modal_projector`: patch states → soft-token embeddings.
pub(crate) struct Projector {
    /// (vision_hidden,) f32, Gemma's `1 + w` applied.
    norm: Tensor,
    norm_eps: f32,
    /// (vision_hidden, text_hidden)
    projection: Tensor,
    patches_per_side: usize,
    pool: usize,
}

impl Projector {
    pub(crate) fn new(
        norm: Tensor,
        norm_eps: f64,
        projection: Tensor,
        patches_per_side: usize,
        tokens_per_image: usize,
    ) -> Result<Self> {
        let side = (tokens_per_image as f64).sqrt().round() as usize;
        if side == 0 || side * side != tokens_per_image {
            return Err(Error::InvalidModel(format!(
                "mm_tokens_per_image ({tokens_per_image}) must be a square number"
            )));
        }
        if !patches_per_side.is_multiple_of(side) {
            return Err(Error::InvalidModel(format!(
                "the {patches_per_side}x{patches_per_side} patch grid cannot be pooled to \
                 {side}x{side} soft tokens (mm_tokens_per_image {tokens_per_image})"
            )));
        }
        Ok(Projector {
            norm,
            norm_eps: norm_eps as f32,
            projection,
            patches_per_side,
            pool: patches_per_side / side,
        })
    }

    /// (B, patches, vision_hidden) → (B, tokens_per_image, text_hidden).
    pub(crate) fn forward(&self, states: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, dv) = states.dims3()?;
        let p = self.patches_per_side;
        if n != p * p {
            candle_core::bail!("{n} patch states for a {p}x{p} grid");
        }
        let grid = states
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, dv, p, p))?;
        let pooled = grid.avg_pool2d(self.pool)?; // (B, dv, side, side)
        let tokens = pooled.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // (B, T, dv)
        let normed = candle_nn::ops::rms_norm(&tokens, &self.norm, self.norm_eps)?;
        let (_, t, _) = normed.dims3()?;
        let flat = normed.reshape((b * t, dv))?;
        let out = if self.projection.dtype() == flat.dtype() {
            flat.matmul(&self.projection)?
        } else {
            flat.to_dtype(self.projection.dtype())?
                .matmul(&self.projection)?
                .to_dtype(DType::F32)?
        };
        out.reshape((b, t, self.projection.dim(1)?))
    }
}

/// The vision side of a multimodal Gemma 3.
pub(crate) struct Vision {
    pub(crate) tower: SiglipVision,
    pub(crate) projector: Projector,
    pub(crate) preprocessor: ImagePreprocessor,
    pub(crate) support: ImageSupport,
}

impl Vision {
    /// Normalized pixels (1, 3, S, S) → soft-token embeddings (T, text_hidden).
    pub(crate) fn encode(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let states = self.tower.forward(pixels)?;
        let tokens = self.projector.forward(&states)?;
        tokens.squeeze(0)
    }
}

/// Spans (`[start, end)`) of consecutive `image_token_id`s in `ids`.
pub(crate) fn image_spans(ids: &[u32], image_token_id: u32) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] == image_token_id {
            let start = i;
            while i < ids.len() && ids[i] == image_token_id {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

/// Prefill chunk boundaries: at most `chunk` tokens each, except that a chunk never ends
/// inside an image span (it ends before the span, or stretches to the span's end when the
/// span starts the chunk).
pub(crate) fn chunk_bounds(
    len: usize,
    chunk: usize,
    spans: &[(usize, usize)],
) -> Vec<(usize, usize)> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < len {
        let mut end = (start + chunk).min(len);
        if let Some(&(s, e)) = spans.iter().find(|&&(s, e)| s < end && end < e) {
            end = if s > start { s } else { e };
        }
        out.push((start, end));
        start = end;
    }
    out
}

impl Gemma3 {
    /// How this model takes images, if it has a vision tower.
    pub(crate) fn image_support(&self) -> Option<&ImageSupport> {
        self.vision().map(|v| &v.support)
    }

    /// Prefills `ids` (placeholders already expanded and tokenized) with `images`, one per
    /// run of soft tokens, and returns the last position's logits; `None` when `sink` was
    /// cancelled. Errors about the images name `images[i]`.
    pub(crate) fn prefill_with_images(
        &mut self,
        ids: &[u32],
        images: &[ImageInput],
        sink: &dyn TokenSink,
    ) -> Result<Option<Vec<f32>>> {
        let Some(vision) = self.vision() else {
            return Err(Error::invalid(
                "images",
                "this model has no vision tower (a text-only checkpoint)",
            ));
        };
        let support = vision.support.clone();
        let spans = image_spans(ids, support.image_token_id);
        if spans.len() != images.len() {
            return Err(Error::invalid(
                "images",
                format!(
                    "{} images for {} image placeholders in the prompt",
                    images.len(),
                    spans.len()
                ),
            ));
        }
        if let Some((i, (s, e))) = spans
            .iter()
            .enumerate()
            .find(|(_, (s, e))| e - s != support.tokens_per_image)
        {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "image {i} has {} soft tokens, the model takes {} per image",
                    e - s,
                    support.tokens_per_image
                ),
            ));
        }
        // Encode every image first: a bad image fails before any prefill work.
        let mut features = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            if sink.is_cancelled() {
                return Ok(None);
            }
            let pixels = vision.preprocessor.pixels(image, i, self.device())?;
            features.push(vision.encode(&pixels)?);
        }
        let mut logits = Vec::new();
        for (start, end) in chunk_bounds(ids.len(), self.prefill_chunk(), &spans) {
            if sink.is_cancelled() {
                return Ok(None);
            }
            let mut blocks = Vec::new();
            let mut chunk_spans = Vec::new();
            for (k, &(s, e)) in spans.iter().enumerate() {
                if s >= start && e <= end {
                    blocks.push((s - start, features[k].clone()));
                    chunk_spans.push((s, e));
                }
            }
            logits = self.forward_with_images(&ids[start..end], start, &blocks, &chunk_spans)?;
        }
        Ok(Some(logits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_runs_of_the_image_token() {
        let ids = [2, 5, 9, 9, 9, 6, 7, 9, 9, 1];
        assert_eq!(image_spans(&ids, 9), vec![(2, 5), (7, 9)]);
        assert_eq!(image_spans(&ids, 42), vec![]);
    }

    #[test]
    fn chunks_never_split_an_image() {
        // Image at 3..9; chunks of 4.
        let b = chunk_bounds(14, 4, &[(3, 9)]);
        assert_eq!(b, vec![(0, 3), (3, 9), (9, 13), (13, 14)]);
        for &(s, e) in &b {
            assert!(
                !(s < 3 && e > 3 && e < 9),
                "chunk {s}..{e} splits the image"
            );
        }
        // Without images: plain chunks.
        assert_eq!(chunk_bounds(10, 4, &[]), vec![(0, 4), (4, 8), (8, 10)]);
        // A span that fits in the chunk stays with it.
        assert_eq!(chunk_bounds(10, 8, &[(2, 5)]), vec![(0, 8), (8, 10)]);
    }
}
