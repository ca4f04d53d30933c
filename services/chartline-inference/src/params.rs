//! Generation parameters and their validation.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Most stop sequences a request may carry.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 256;

/// How to generate. `temperature == 0` is greedy decoding (bit-reproducible on one backend);
/// otherwise sampling, reproducible for a given `seed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateParams {
    /// Most tokens to generate; at least 1. Prompt tokens plus this must fit the context.
    pub max_tokens: u32,
    /// Softmax temperature in `[0, 2]`; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this cumulative probability,
    /// in `(0, 1]`; 1 keeps all.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Divides positive logits (multiplies negative ones) of tokens already in the prompt or
    /// output, in `(0, 2]`; 1 is off.
    pub repetition_penalty: f32,
    /// Seed for sampling. `None` draws one; the seed used is reported with the result.
    pub seed: Option<u64>,
    /// Generation stops when the output contains one of these; the stop sequence itself is
    /// not part of the output. At most [`MAX_STOP_SEQUENCES`], each 1 to
    /// [`MAX_STOP_SEQUENCE_BYTES`] bytes.
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl GenerateParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        GenerateParams {
            max_tokens,
            ..Self::default()
        }
    }

    /// Whether these parameters decode greedily.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field; the error names the first bad one and its limit.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::invalid("max_tokens", "must be at least 1 (got 0)"));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(Error::invalid(
                "temperature",
                format!("must be in [0, 2] (got {})", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                format!("must be in (0, 1] (got {})", self.top_p),
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return Err(Error::invalid(
                "repetition_penalty",
                format!("must be in (0, 2] (got {})", self.repetition_penalty),
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(Error::invalid(
                "stop",
                format!(
                    "may hold at most {MAX_STOP_SEQUENCES} sequences (got {})",
                    self.stop.len()
                ),
            ));
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() || s.len() > MAX_STOP_SEQUENCE_BYTES {
                return Err(Error::invalid(
                    format!("stop[{i}]"),
                    format!(
                        "must be 1 to {MAX_STOP_SEQUENCE_BYTES} bytes long (got {})",
                        s.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks that a prompt of `prompt_tokens` plus `max_tokens` fits `context_length`.
pub(crate) fn check_context(
    prompt_tokens: usize,
    max_tokens: u32,
    context_length: usize,
) -> Result<()> {
    if prompt_tokens == 0 {
        return Err(Error::invalid("prompt", "must not be empty"));
    }
    let total = prompt_tokens.saturating_add(max_tokens as usize);
    if total > context_length {
        return Err(Error::invalid(
            "prompt",
            format!(
                "is {prompt_tokens} tokens; with max_tokens {max_tokens} that is {total}, \
                 over the context length of {context_length}"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(p: GenerateParams) -> Option<String> {
        p.validate()
            .err()
            .and_then(|e| e.field().map(str::to_owned))
    }

    #[test]
    fn defaults_are_valid_and_greedy() {
        let p = GenerateParams::default();
        assert!(p.validate().is_ok(), "defaults validate");
        assert!(p.is_greedy(), "defaults are greedy");
    }

    #[test]
    fn each_bad_field_is_named() {
        let d = GenerateParams::default;
        assert_eq!(
            field_of(GenerateParams {
                max_tokens: 0,
                ..d()
            })
            .as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            field_of(GenerateParams {
                temperature: -1.0,
                ..d()
            })
            .as_deref(),
            Some("temperature")
        );
        assert_eq!(
            field_of(GenerateParams {
                temperature: f32::NAN,
                ..d()
            })
            .as_deref(),
            Some("temperature")
        );
        assert_eq!(
            field_of(GenerateParams { top_p: 1.5, ..d() }).as_deref(),
            Some("top_p")
        );
        assert_eq!(
            field_of(GenerateParams { top_p: 0.0, ..d() }).as_deref(),
            Some("top_p")
        );
        assert_eq!(
            field_of(GenerateParams {
                repetition_penalty: 0.0,
                ..d()
            })
            .as_deref(),
            Some("repetition_penalty")
        );
        assert_eq!(
            field_of(GenerateParams {
                stop: vec!["ok".into(), String::new()],
                ..d()
            })
            .as_deref(),
            Some("stop[1]")
        );
    }

    #[test]
    fn temperature_message_states_the_limit() {
        let e = GenerateParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate();
        assert_eq!(
            e.err().map(|e| e.to_string()).as_deref(),
            Some("temperature must be in [0, 2] (got -1)")
        );
    }

    #[test]
    fn context_overflow_names_the_prompt() {
        let e = check_context(100, 30, 128).err();
        assert_eq!(e.as_ref().and_then(|e| e.field()), Some("prompt"));
        assert!(
            check_context(100, 28, 128).is_ok(),
            "exactly full context is allowed"
        );
    }
}
