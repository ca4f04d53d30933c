//! The decode loop shared by local models: prefill in chunks, sample, detokenize
//! incrementally, stop on end tokens, stop sequences or `max_tokens`.

use crate::backend::ImageInput;
use crate::backend::{
    Backend, Completion, FinishReason, GeneratedToken, GenerationRequest, TokenSink, Usage,
};
use crate::error::{Error, Result};
use crate::gemma3::ImageSupport;
use crate::identity::ModelIdentity;
use crate::params::check_context;
use crate::sampling::{Sampler, fresh_seed};
use crate::tokenizer::Tokenizer;

/// A local causal language model holding one sequence's state (its KV cache).
pub trait CausalLm: Send + 'static {
    /// Most positions (prompt plus output) one sequence may use.
    fn context_length(&self) -> usize;

    /// Prompt tokens per forward pass during prefill.
    fn prefill_chunk(&self) -> usize;

    /// Runs `tokens` as positions `pos ..` of the current sequence and returns the logits of
    /// the last token. `pos == 0` starts a new sequence; otherwise `pos` continues the
    /// current one.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>>;

    /// How the model takes images; `None` (the default) for a text-only model.
    fn image_support(&self) -> Option<&ImageSupport> {
        None
    }

    /// Prefills a whole prompt whose image placeholders are expanded (`ids`) with its
    /// `images`, returning the last logits, or `None` when `sink` was cancelled. Only called
    /// when [`image_support`](Self::image_support) is `Some`.
    fn prefill_with_images(
        &mut self,
        ids: &[u32],
        images: &[ImageInput],
        sink: &dyn TokenSink,
    ) -> Result<Option<Vec<f32>>> {
        let _ = (ids, images, sink);
        Err(Error::invalid("images", "this model does not take images"))
    }
}

/// A [`Backend`] for any local [`CausalLm`] with its tokenizer.
pub struct LocalBackend<M> {
    model: M,
    tokenizer: Tokenizer,
    identity: ModelIdentity,
}

impl<M: CausalLm> LocalBackend<M> {
    /// Pairs a model with its tokenizer and identity.
    pub fn new(model: M, tokenizer: Tokenizer, identity: ModelIdentity) -> Self {
        LocalBackend {
            model,
            tokenizer,
            identity,
        }
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The model, mutably (benchmarks drive `forward` directly).
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }
}

impl<M: CausalLm> Backend for LocalBackend<M> {
    fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        Some(&self.tokenizer)
    }

    fn image_support(&self) -> Option<&ImageSupport> {
        self.model.image_support()
    }

    fn generate(
        &mut self,
        request: &GenerationRequest,
        sink: &mut dyn TokenSink,
    ) -> Result<Completion> {
        let params = &request.params;
        if let Some(support) = self.model.image_support() {
            // Soft tokens come only from expanding placeholders; a prompt spelling them
            // would shift every image's span.
            if let Some(t) = support
                .reserved
                .iter()
                .find(|t| request.prompt.contains(t.as_str()))
            {
                return Err(Error::invalid(
                    "prompt",
                    format!("must not contain the reserved image token {t}"),
                ));
            }
        }
        let prompt_ids = if request.images.is_empty() {
            if let Some(support) = self.model.image_support()
                && request.prompt.contains(support.placeholder.as_str())
            {
                return Err(Error::invalid(
                    "images",
                    format!(
                        "the prompt has {} placeholders but no images were sent",
                        support.placeholder
                    ),
                ));
            }
            self.tokenizer.encode(&request.prompt, true)?
        } else {
            let support = self.model.image_support().ok_or_else(|| {
                Error::invalid(
                    "images",
                    format!(
                        "model {} is text-only and does not take images",
                        self.identity.name
                    ),
                )
            })?;
            let placeholders = request.prompt.matches(support.placeholder.as_str()).count();
            if placeholders != request.images.len() {
                return Err(Error::invalid(
                    "images",
                    format!(
                        "{} images for {placeholders} {} placeholders in the prompt (one per image)",
                        request.images.len(),
                        support.placeholder
                    ),
                ));
            }
            let expanded = request
                .prompt
                .replace(support.placeholder.as_str(), &support.expansion);
            self.tokenizer.encode(&expanded, true)?
        };
        check_context(
            prompt_ids.len(),
            params.max_tokens,
            self.model.context_length(),
        )?;
        let seed = (!params.is_greedy()).then(|| params.seed.unwrap_or_else(fresh_seed));
        let mut usage = Usage {
            prompt_tokens: prompt_ids.len(),
            completion_tokens: 0,
        };
        let finish = |reason: FinishReason, usage: Usage| Completion {
            usage,
            finish_reason: reason,
            model: self.identity.clone(),
            seed,
        };

        let mut pos = 0;
        let mut logits = Vec::new();
        if request.images.is_empty() {
            for chunk in prompt_ids.chunks(self.model.prefill_chunk().max(1)) {
                if sink.is_cancelled() {
                    return Ok(finish(FinishReason::Cancelled, usage));
                }
                logits = self.model.forward(chunk, pos)?;
                pos += chunk.len();
            }
        } else {
            match self
                .model
                .prefill_with_images(&prompt_ids, &request.images, sink)?
            {
                Some(l) => logits = l,
                None => return Ok(finish(FinishReason::Cancelled, usage)),
            }
            pos = prompt_ids.len();
        }

        let mut sampler = Sampler::new(params, seed.unwrap_or(0), &prompt_ids);
        let stop_ids = self.tokenizer.special_tokens().stop_ids();
        let mut text = TextStream::new(&self.tokenizer, &params.stop);
        loop {
            let token = sampler.sample(&mut logits);
            usage.completion_tokens += 1;
            let end_token = stop_ids.contains(&token);
            let at_limit = usage.completion_tokens >= params.max_tokens as usize;
            let (released, hit_stop) = if end_token {
                (text.finish()?, false)
            } else {
                text.push(token, at_limit)?
            };
            if !sink.token(GeneratedToken {
                id: token,
                text: released,
            }) {
                return Ok(finish(FinishReason::Cancelled, usage));
            }
            let reason = if hit_stop {
                Some(FinishReason::StopSequence)
            } else if end_token {
                Some(FinishReason::Stop)
            } else if at_limit {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                return Ok(finish(reason, usage));
            }
            logits = self.model.forward(&[token], pos)?;
            pos += 1;
        }
    }
}

/// Turns generated ids into text deltas: decodes incrementally so multi-token UTF-8
/// characters come out whole, and holds back text that may be the start of a stop sequence.
pub(crate) struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    stop: &'a [String],
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Decoded text not yet released.
    pending: String,
}

impl<'a> TextStream<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer, stop: &'a [String]) -> Self {
        TextStream {
            tokenizer,
            stop,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            pending: String::new(),
        }
    }

    /// Adds a token. Returns the text to release and whether a stop sequence was reached
    /// (then the text is everything before it). With `last`, releases all that is left.
    pub(crate) fn push(&mut self, id: u32, last: bool) -> Result<(String, bool)> {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], true)?;
        if let Some(delta) = full.get(prefix.len()..)
            && !delta.is_empty()
            && !full.ends_with('\u{FFFD}')
        {
            self.pending.push_str(delta);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        if let Some(at) = self.earliest_stop() {
            self.pending.truncate(at);
            return Ok((std::mem::take(&mut self.pending), true));
        }
        if last {
            return Ok((self.finish()?, false));
        }
        let keep = self.held_back();
        let release = self.pending.len() - keep;
        let rest = self.pending.split_off(release);
        Ok((std::mem::replace(&mut self.pending, rest), false))
    }

    /// Releases everything left, including a trailing incomplete character.
    pub(crate) fn finish(&mut self) -> Result<String> {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], true)?;
        if let Some(delta) = full.get(prefix.len()..) {
            self.pending.push_str(delta);
        }
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(std::mem::take(&mut self.pending))
    }

    fn earliest_stop(&self) -> Option<usize> {
        self.stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
    }

    /// Bytes at the end of `pending` that could begin a stop sequence.
    fn held_back(&self) -> usize {
        let mut keep = 0;
        for s in self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if i > keep && self.pending.ends_with(&s[..i]) {
                    keep = i;
                }
            }
        }
        keep
    }
}
