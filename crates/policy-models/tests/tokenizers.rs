//! cotlab's tokenizations of varied texts equal transformers' for the real tokenizer files in
//! `../shared/tokenizers/` (fixture made by `tools/fixtures/make_tokenizer_fixtures.py`).

use std::path::PathBuf;

use policy_models::PolicyTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    add_bos_token_config: serde_json::Value,
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
    assert_eq!(
        tokenizer.decode(&ids, false).unwrap(),
        case.decoded,
        "{} ({how}) decoding {:?}",
        case.tokenizer,
        case.text
    );
}

#[test]
fn encodings_and_decodings_equal_transformers() {
    let fixture = fixture();
    for name in ["gpt2", "distilroberta-base", "qwen2.5-instruct", "llama-3.2-instruct", "smollm2-instruct"] {
        // Each folder as shipped: tokenizer.json for GPT-2 and DistilRoBERTa, vocab.json +
        // merges.txt + tokenizer_config.json for Qwen2.5, Meta's tiktoken ranks +
        // tokenizer_config.json for Llama 3.2, tokenizer.json + tokenizer_config.json +
        // config.json for SmolLM2.
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
        std::fs::write(dir.path().join("tokenizer_config.json"), format!(r#"{{"tokenizer_class": "{class}"}}"#))
            .unwrap();
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
    // Its config.json says bos_token_id = 1 and its tokenizer_config.json names <|im_start|>,
    // but its tokenizer.json's template adds nothing.
    let smollm2 = PolicyTokenizer::load_dir(&shared_tokenizers().join("smollm2-instruct")).unwrap();
    assert_eq!((smollm2.bos_id, smollm2.eos_ids.clone(), smollm2.pad_id), (Some(1), vec![2], Some(2)));
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

#[test]
fn only_the_tokenizer_puts_a_bos_in_front() {
    let fixture = fixture();
    let expected = [
        ("gpt2", None),
        ("qwen2.5-instruct", None),
        ("smollm2-instruct", None),
        ("llama-3.2-instruct", Some(128000)),
        ("distilroberta-base", Some(0)),
    ];
    for (name, bos) in expected {
        let tokenizer = PolicyTokenizer::load_dir(&shared_tokenizers().join(name)).unwrap();
        assert_eq!(tokenizer.prepended_bos(), bos, "{name}");
        let case = fixture.cases.iter().find(|case| case.tokenizer == name && case.text == "Hello world").unwrap();
        if let Some(bos) = bos {
            assert_eq!(case.ids.first(), Some(&bos), "{name}: the fixture disagrees");
        }
        // Without special tokens nothing is added, whatever the tokenizer: the fixture's ids less
        // its BOS (RoBERTa's `</s>` at the end too).
        let ids = tokenizer.encode("Hello world", false).unwrap();
        let skip = usize::from(bos.is_some());
        assert!(!ids.is_empty() && ids.len() + skip <= case.ids.len(), "{name}: {ids:?} vs {:?}", case.ids);
        assert_eq!(ids[..], case.ids[skip..ids.len() + skip], "{name}");
    }
    // A model config's bos_token_id alone adds nothing (GPT-Neo's config.json says 50256).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(shared_tokenizers().join("gpt2/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"bos_token_id": 50256, "eos_token_id": 50256}"#).unwrap();
    let tokenizer = PolicyTokenizer::load_dir(dir.path()).unwrap();
    assert_eq!((tokenizer.bos_id, tokenizer.prepended_bos()), (None, None));
    assert_eq!(tokenizer.encode("Hello world", true).unwrap(), vec![15496, 995]);
}

#[test]
fn add_bos_token_without_a_tokenizer_json_puts_the_bos_in_front_as_transformers_does() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(shared_tokenizers().join("gpt2").join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer_config.json"), fixture.add_bos_token_config.to_string()).unwrap();
    let tokenizer = PolicyTokenizer::load_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.prepended_bos(), Some(50256));
    let cases: Vec<&Case> = fixture.cases.iter().filter(|case| case.tokenizer == "gpt2+add_bos_token").collect();
    assert!(cases.len() >= 8);
    for case in cases {
        check(&tokenizer, case, "vocab.json + merges.txt + add_bos_token");
    }
}

#[test]
fn a_bos_template_survives_saving_and_loading() {
    let texts = ["Q: What is 2 + 3?\nA: 5".to_string(), "Q: What is 4 + 4?\nA: 8".to_string()];
    let trained = policy_models::presets::train_tokenizer(texts.into_iter(), 300).unwrap();
    let eos = trained.eos_ids[0];
    assert_eq!(trained.prepended_bos(), None);
    let plain = trained.encode("What is 2 + 3?", true).unwrap();
    let tokenizer = trained.prepending_bos(eos).unwrap();
    assert_eq!((tokenizer.bos_id, tokenizer.prepended_bos()), (Some(eos), Some(eos)));
    let with_bos = tokenizer.encode("What is 2 + 3?", true).unwrap();
    assert_eq!(with_bos, [vec![eos], plain.clone()].concat());
    assert_eq!(tokenizer.encode("What is 2 + 3?", false).unwrap(), plain);
    let dir = tempfile::tempdir().unwrap();
    tokenizer.save(&dir.path().join("tokenizer.json")).unwrap();
    let reloaded = PolicyTokenizer::load_dir(dir.path()).unwrap();
    assert_eq!(reloaded.prepended_bos(), Some(eos));
    assert_eq!(reloaded.encode("What is 2 + 3?", true).unwrap(), with_bos);
}
