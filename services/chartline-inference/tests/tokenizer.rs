//! The GGUF-built tokenizer against llama.cpp's token ids for the same file.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use chartline_inference::{Tokenizer, TokenizerSource};

fn gemma_tokenizer() -> Tokenizer {
    Tokenizer::from_model_path(common::gemma_path()).expect("tokenizer loads from the GGUF")
}

#[test]
fn every_reference_text_tokenizes_exactly_as_llama_cpp() {
    let tok = gemma_tokenizer();
    let reference = common::reference();
    assert_eq!(reference.tokenization.len(), 26, "the fixture has 26 texts");
    let mut mismatches = Vec::new();
    for (i, case) in reference.tokenization.iter().enumerate() {
        let ids = tok.encode(&case.text, true).expect("encodes");
        if ids != case.ids {
            mismatches.push(format!(
                "#{i} {:?}\n  ours:     {ids:?}\n  llama.cpp {:?}",
                case.text, case.ids
            ));
        }
    }
    let matched = reference.tokenization.len() - mismatches.len();
    println!(
        "tokenizer: {matched}/{} reference texts match llama.cpp",
        reference.tokenization.len()
    );
    assert!(
        mismatches.is_empty(),
        "token ids differ from llama.cpp:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn greedy_prompts_tokenize_as_llama_cpp() {
    let tok = gemma_tokenizer();
    for case in common::reference().greedy {
        assert_eq!(
            tok.encode(&case.prompt, true).unwrap(),
            case.prompt_ids,
            "prompt {:?}",
            case.prompt
        );
    }
}

#[test]
fn special_tokens_are_recognised_in_text_and_have_their_ids() {
    let tok = gemma_tokenizer();
    let s = tok.special_tokens();
    assert_eq!(
        (s.bos, s.eos, s.start_of_turn, s.end_of_turn),
        (Some(2), Some(1), Some(105), Some(106))
    );
    assert_eq!(tok.encode("<bos>", false).unwrap(), vec![2]);
    assert_eq!(tok.encode("<eos>", false).unwrap(), vec![1]);
    assert_eq!(tok.encode("<start_of_turn>", false).unwrap(), vec![105]);
    assert_eq!(tok.encode("<end_of_turn>", false).unwrap(), vec![106]);
    let turn = tok
        .encode("<start_of_turn>user\nHi<end_of_turn>\n", true)
        .unwrap();
    assert_eq!(turn.first(), Some(&2), "BOS first");
    assert_eq!(turn.get(1), Some(&105), "then <start_of_turn>");
    assert!(turn.contains(&106), "<end_of_turn> recognised: {turn:?}");
}

#[test]
fn decode_round_trips_text_and_count_matches_encode() {
    let tok = gemma_tokenizer();
    for text in [
        "The patient has type 2 diabetes mellitus.",
        "Temperature 38.5°C,  dose 5 µg/kg/min.\n\n患者",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip");
        assert_eq!(
            tok.count_tokens(text).unwrap(),
            ids.len(),
            "count equals encode without BOS"
        );
    }
}

#[test]
fn tokenizer_loads_without_weights_and_reports_a_stable_hash() {
    let path = common::gemma_path();
    let started = std::time::Instant::now();
    let a = Tokenizer::from_model_path(&path).unwrap();
    let elapsed = started.elapsed();
    let b = Tokenizer::from_model_path(path.parent().unwrap()).unwrap();
    assert_eq!(
        a.sha256(),
        b.sha256(),
        "same definition, same hash, whether by file or folder"
    );
    assert_eq!(a.sha256().len(), 64);
    assert!(matches!(a.source(), TokenizerSource::Gguf(_)));
    println!("tokenizer load: {elapsed:?}");
}

#[test]
fn missing_model_path_is_not_found() {
    let e = Tokenizer::from_model_path("/definitely/not/here.gguf").unwrap_err();
    assert_eq!(e.category(), chartline_inference::ErrorCategory::NotFound);
}

#[test]
fn a_folder_with_tokenizer_json_uses_it_without_its_padding() {
    let dir = common::minilm_path();
    let tok = Tokenizer::from_model_path(&dir).unwrap();
    assert!(
        matches!(tok.source(), TokenizerSource::TokenizerJson(_)),
        "tokenizer.json preferred"
    );
    let bytes = std::fs::read(dir.join("tokenizer.json")).unwrap();
    use sha2::Digest as _;
    assert_eq!(
        tok.sha256(),
        hex::encode(sha2::Sha256::digest(&bytes)),
        "hash of the file's bytes"
    );
    // The file pads to 128; counting must not.
    assert_eq!(tok.count_tokens("heart attack").unwrap(), 2);
}
