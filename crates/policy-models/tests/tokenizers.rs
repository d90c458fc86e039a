//! cotlab's tokenizations of varied texts equal transformers' for the real tokenizer files in
//! `../shared/tokenizers/` (fixture made by `tools/fixtures/make_tokenizer_fixtures.py`).

use std::path::PathBuf;

use policy_models::PolicyTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    tokenizer: String,
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn shared_tokenizers() -> PathBuf {
    let root = std::env::var_os("COTLAB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    root.join("tokenizers")
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check(tokenizer: &PolicyTokenizer, case: &Case, how: &str) {
    let ids = tokenizer.encode(&case.text, true).unwrap();
    assert_eq!(ids, case.ids, "{} ({how}) encoding {:?}", case.tokenizer, case.text);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), case.decoded, "{} ({how}) decoding {:?}", case.tokenizer, case.text);
}

#[test]
fn encodings_and_decodings_equal_transformers() {
    let fixture = fixture();
    for name in ["gpt2", "distilroberta-base", "qwen2.5-instruct", "llama-3.2-instruct"] {
        // Each folder as shipped: tokenizer.json for GPT-2 and DistilRoBERTa, vocab.json +
        // merges.txt + tokenizer_config.json for Qwen2.5, Meta's tiktoken ranks +
        // tokenizer_config.json for Llama 3.2.
        let tokenizer = PolicyTokenizer::load_dir(&shared_tokenizers().join(name)).unwrap();
        let cases: Vec<&Case> = fixture.cases.iter().filter(|case| case.tokenizer == name).collect();
        assert!(cases.len() >= 8, "{name}");
        for case in cases {
            check(&tokenizer, case, "as shipped");
        }
    }
}

#[test]
fn vocab_and_merges_alone_give_the_same_tokens_as_tokenizer_json() {
    let fixture = fixture();
    for (name, class) in [("gpt2", "GPT2Tokenizer"), ("distilroberta-base", "RobertaTokenizer")] {
        let dir = tempfile::tempdir().unwrap();
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(shared_tokenizers().join(name).join(file), dir.path().join(file)).unwrap();
        }
        std::fs::write(dir.path().join("tokenizer_config.json"), format!(r#"{{"tokenizer_class": "{class}"}}"#)).unwrap();
        let tokenizer = PolicyTokenizer::load_dir(dir.path()).unwrap();
        for case in fixture.cases.iter().filter(|case| case.tokenizer == name) {
            check(&tokenizer, case, "vocab.json + merges.txt");
        }
    }
}

#[test]
fn special_ids_come_from_the_configs() {
    let qwen = PolicyTokenizer::load_dir(&shared_tokenizers().join("qwen2.5-instruct")).unwrap();
    assert_eq!(qwen.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(qwen.eos_ids, vec![151645]);
    assert_eq!(qwen.pad_id, Some(151643));
    assert_eq!(qwen.bos_id, None);
    let llama = PolicyTokenizer::load_dir(&shared_tokenizers().join("llama-3.2-instruct")).unwrap();
    assert_eq!(llama.vocab_size(), 128_256);
    assert_eq!(llama.bos_id, Some(128000));
    // generation_config.json lists <|end_of_text|>, <|eom_id|> and <|eot_id|>.
    assert_eq!(llama.eos_ids, vec![128001, 128008, 128009]);
    let roberta = PolicyTokenizer::load_dir(&shared_tokenizers().join("distilroberta-base")).unwrap();
    assert_eq!((roberta.bos_id, roberta.pad_id), (Some(0), Some(1)));
    assert_eq!(roberta.eos_ids, vec![2]);
}

#[test]
fn a_corrupt_tiktoken_file_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("original_tokenizer.model"), "IQ== 0\nIg== 1\nnot base64!\n").unwrap();
    let error = PolicyTokenizer::load_dir(dir.path()).unwrap_err().to_string();
    assert!(error.contains("original_tokenizer.model") && error.contains("line 3"), "{error}");
}
