//! A SentencePiece-BPE tokenizer rebuilt from GGUF metadata.
//!
//! SentencePiece BPE (and llama.cpp's `llm_tokenizer_spm`) starts from the characters of the
//! text (spaces already replaced by `▁`), repeatedly merges the adjacent pair whose
//! concatenation is a vocabulary piece with the highest score (leftmost on ties), and emits
//! `<0xNN>` byte tokens for characters outside the vocabulary. A Hugging Face BPE reproduces
//! that when its merge list holds, for every normal piece, each split into two normal pieces,
//! ranked by the merged piece's score. Control tokens (`<bos>`, `<start_of_turn>`…) and
//! user-defined tokens (runs of spaces, tabs and newlines, HTML tags) are matched in the raw
//! text before the BPE runs, as llama.cpp does when it tokenizes with `special = true`.
//!
//! The tokenizer's sha256 is computed over: the model name, then for each token its byte
//! length (u64 LE) and bytes, then all scores (f32 LE), then all token types (i32 LE).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use sha2::{Digest, Sha256};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::{AddedToken, DecoderWrapper};

use super::SpecialTokens;
use crate::error::{Error, Result};

// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

pub(super) struct Built {
    pub tokenizer: tokenizers::Tokenizer,
    pub special: SpecialTokens,
    pub sha256: String,
}

pub(super) fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Built> {
    let model = get(md, "tokenizer.ggml.model")?
        .to_string()
        .map_err(bad("tokenizer.ggml.model"))?;
    if model != "llama" {
        return Err(Error::InvalidModel(format!(
            "GGUF tokenizer model {model:?} is not supported (only the SentencePiece \"llama\" kind)"
        )));
    }
    let tokens: Vec<&str> = array(md, "tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().map(String::as_str))
        .collect::<Result<_, _>>()
        .map_err(bad("tokenizer.ggml.tokens"))?;
    let scores: Vec<f32> = array(md, "tokenizer.ggml.scores")?
        .iter()
        .map(Value::to_f32)
        .collect::<Result<_, _>>()
        .map_err(bad("tokenizer.ggml.scores"))?;
    let types: Vec<i32> = array(md, "tokenizer.ggml.token_type")?
        .iter()
        .map(Value::to_i32)
        .collect::<Result<_, _>>()
        .map_err(bad("tokenizer.ggml.token_type"))?;
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(Error::InvalidModel(format!(
            "GGUF tokenizer arrays disagree: {} tokens, {} scores, {} types",
            tokens.len(),
            scores.len(),
            types.len()
        )));
    }
    let n = u32::try_from(tokens.len())
        .map_err(|_| Error::InvalidModel("GGUF vocabulary too large".into()))?;

    let sha256 = tokenizer_sha256(model, &tokens, &scores, &types);
    let hf = build(&tokens, &scores, &types)?;

    let meta_id = |key: &str| -> Option<u32> {
        md.get(key)
            .and_then(|v| v.to_u32().ok())
            .filter(|&id| id < n)
    };
    let by_text = |text: &str| -> Option<u32> { hf.token_to_id(text) };
    let special = SpecialTokens {
        bos: meta_id("tokenizer.ggml.bos_token_id").or_else(|| by_text("<bos>")),
        eos: meta_id("tokenizer.ggml.eos_token_id").or_else(|| by_text("<eos>")),
        pad: meta_id("tokenizer.ggml.padding_token_id").or_else(|| by_text("<pad>")),
        start_of_turn: by_text("<start_of_turn>"),
        end_of_turn: meta_id("tokenizer.ggml.eot_token_id").or_else(|| by_text("<end_of_turn>")),
    };
    Ok(Built {
        tokenizer: hf,
        special,
        sha256,
    })
}

fn build(tokens: &[&str], scores: &[f32], types: &[i32]) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| ((*t).to_owned(), id as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(Error::InvalidModel(
            "GGUF vocabulary has duplicate token texts".into(),
        ));
    }
    let is_normal = |id: u32| types[id as usize] == TYPE_NORMAL;

    // Every split of every normal piece into two normal pieces is a merge; the merged piece's
    // score ranks it (higher first). Ties between different splits of one piece are broken
    // by the ids of the halves, which keeps the order deterministic.
    let mut ranked: Vec<(f32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != TYPE_NORMAL {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right))
                && is_normal(l)
                && is_normal(r)
            {
                ranked.push((scores[id], l, r));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, l, r)| (tokens[l as usize].to_owned(), tokens[r as usize].to_owned()))
        .collect();

    let unk = tokens
        .iter()
        .zip(types)
        .find(|(_, ty)| **ty == TYPE_UNKNOWN)
        .map(|(t, _)| (*t).to_owned())
        .or_else(|| vocab.contains_key("<unk>").then(|| "<unk>".to_owned()));
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk);
    }
    let bpe = bpe.build().map_err(Error::tokenizer)?;

    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_normalizer(Some(Replace::new(" ", "▁").map_err(Error::tokenizer)?))
        .map_err(Error::tokenizer)?;
    let decoder = Sequence::new(vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(Error::tokenizer)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ]);
    hf.with_decoder(Some(decoder));

    let mut control = Vec::new();
    let mut user = Vec::new();
    for (t, ty) in tokens.iter().zip(types) {
        match *ty {
            TYPE_CONTROL | TYPE_UNKNOWN => {
                control.push(AddedToken::from(*t, true).normalized(false))
            }
            TYPE_USER_DEFINED => user.push(AddedToken::from(*t, false).normalized(false)),
            _ => {}
        }
    }
    hf.add_special_tokens(control).map_err(Error::tokenizer)?;
    hf.add_tokens(user).map_err(Error::tokenizer)?;
    Ok(hf)
}

fn tokenizer_sha256(model: &str, tokens: &[&str], scores: &[f32], types: &[i32]) -> String {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    for t in tokens {
        h.update((t.len() as u64).to_le_bytes());
        h.update(t.as_bytes());
    }
    for s in scores {
        h.update(s.to_le_bytes());
    }
    for t in types {
        h.update(t.to_le_bytes());
    }
    hex::encode(h.finalize())
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key)
        .ok_or_else(|| Error::InvalidModel(format!("GGUF metadata lacks {key}")))
}

fn array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Vec<Value>> {
    get(md, key)?.to_vec().map_err(bad(key))
}

fn bad(key: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::InvalidModel(format!("GGUF metadata {key}: {e}"))
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn toy() -> tokenizers::Tokenizer {
        // ids: 0 <pad> 1 <eos> 2 <bos> 3 <unk>, then pieces, then byte tokens.
        let mut tokens = vec![
            "<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "b", "ab", "▁ab", "  ",
        ];
        let mut scores = vec![0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, 0.0];
        let mut types = vec![3, 3, 3, 2, 1, 1, 1, 1, 1, 4];
        let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        for b in &bytes {
            tokens.push(b);
            scores.push(0.0);
            types.push(6);
        }
        build(&tokens, &scores, &types).expect("toy vocabulary builds")
    }

    #[test]
    fn merges_follow_piece_scores_and_bytes_fall_back() {
        let tok = toy();
        let ids = tok
            .encode_fast(" ab<bos>c  b", false)
            .map(|e| e.get_ids().to_vec());
        // "▁ab" (8), <bos> (2), 'c' as byte 0x63 (10 + 0x63 = 109), "  " (9), 'b' (6)
        assert_eq!(ids.ok(), Some(vec![8, 2, 109, 9, 6]));
    }

    #[test]
    fn decoding_restores_spaces_and_bytes() {
        let tok = toy();
        assert_eq!(
            tok.decode(&[8, 109, 9, 6], false).ok().as_deref(),
            Some(" abc  b")
        );
    }
}
