//! GGUF loading against outside references (fixtures from `tools/parity/make_gguf_fixtures.py`):
//! dequantization against gguf-py, and the shared SmolLM2-135M-Instruct Q4_1 file against
//! transformers' own GGUF loader (tokens, chat prompt, logits within 1e-4, greedy tokens).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::Device;
use policy_models::generate::{GenerationConfig, Sampler, generate};
use policy_models::gguf::{GgmlType, GgufFile, dequantize};
use policy_models::{CausalLm, LoadError, PolicyTokenizer, StepInput};
use serde_json::Value;
use tokenizers::Tokenizer;

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn shared() -> PathBuf {
    std::env::var_os("COTLAB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

fn smollm2() -> PathBuf {
    shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|id| id.as_u64().unwrap() as u32).collect()
}

#[test]
fn dequantization_matches_gguf_py_for_every_block_type() {
    let cases = fixture("blocks.json");
    let types = [
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4K),
        ("Q5_K", GgmlType::Q5K),
        ("Q6_K", GgmlType::Q6K),
    ];
    for (name, dtype) in types {
        let case = &cases[name];
        let hex = case["hex"].as_str().unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let expected: Vec<f32> =
            case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let ours = dequantize(dtype, &bytes);
        assert_eq!(ours.len(), expected.len(), "{name}");
        for (index, (a, b)) in ours.iter().zip(&expected).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{name} value {index}: {a} vs gguf-py {b}");
        }
    }
}

#[test]
fn smollm2_tokenizer_matches_transformers_gguf_loader() {
    let file = GgufFile::open(&smollm2()).unwrap();
    let tokenizer = Tokenizer::from_str(&file.tokenizer_json().unwrap().to_string()).unwrap();
    let reference = fixture("smollm2.json");
    for case in reference["plain"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ours = tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ours, ids(&case["ids"]), "{text:?}");
    }
    // The file's chat template renders transformers' text, which tokenizes to its ids.
    let config = file.tokenizer_config_json();
    let template = prompting::ChatTemplate::from_tokenizer_config_json(&config, "gguf").unwrap();
    let options = prompting::RenderOptions { add_generation_prompt: true, ..Default::default() };
    for case in reference["chat"].as_array().unwrap() {
        let messages = [prompting::Message::new(prompting::Role::User, case["question"].as_str().unwrap())];
        let text = template.render(&messages, &options).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        assert_eq!(tokenizer.encode(text.as_str(), false).unwrap().get_ids(), ids(&case["ids"]).as_slice());
    }
    assert_eq!(config["bos_token"], "<|im_start|>");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(config["add_bos_token"], false);
}

#[test]
fn smollm2_logits_and_greedy_tokens_match_transformers() {
    let device = Device::flex();
    let model = CausalLm::load_gguf(&smollm2(), &device).unwrap();
    let reference = fixture("smollm2.json");
    let logits_ref = &reference["logits"];
    let prompt: Vec<i64> = ids(&logits_ref["ids"]).into_iter().map(i64::from).collect();
    let input = StepInput::from_padded(std::slice::from_ref(&prompt), &[vec![true; prompt.len()]]);
    let logits = model.forward(&input, &mut model.new_cache());
    let [_, length, vocab] = logits.dims();
    let values = logits.into_data().try_to_vec::<f32>().unwrap();
    let columns = ids(&logits_ref["columns"]);
    // The largest difference from the reference's logits (at the fixture's columns) and
    // log-sum-exps (over the whole vocabulary), for its float32 or float64 evaluation.
    let worst = |suffix: &str| {
        let mut worst = 0.0f64;
        for t in 0..length {
            let row = &values[t * vocab..(t + 1) * vocab];
            for (column, expected) in columns.iter().zip(logits_ref[format!("values{suffix}")][t].as_array().unwrap()) {
                worst = worst.max((f64::from(row[*column as usize]) - expected.as_f64().unwrap()).abs());
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let logsumexp = max + row.iter().map(|v| (f64::from(*v) - max).exp()).sum::<f64>().ln();
            worst = worst.max((logsumexp - logits_ref[format!("logsumexp{suffix}")][t].as_f64().unwrap()).abs());
        }
        worst
    };
    for t in 0..length {
        let row = &values[t * vocab..(t + 1) * vocab];
        let argmax = row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best });
        assert_eq!(argmax as u64, logits_ref["argmax"][t].as_u64().unwrap(), "argmax at position {t}");
    }
    let (exact, float32) = (worst("_f64"), worst(""));
    println!(
        "SmolLM2 GGUF, {length} positions: max |difference| {exact:.2e} from transformers in float64, {float32:.2e} from float32"
    );
    // Two float32 evaluations differ by their summation orders (transformers' own float32 logits
    // are 6.8e-5 from its float64 ones here), so the reference is the float64 evaluation. On an
    // AVX-512 machine cotlab's worst position (13, where activations are largest) is 9.9e-5 from it
    // and the median position 2.3e-5; the bound leaves room for other CPUs' summation orders.
    assert!(exact <= 1.5e-4, "max abs difference from transformers' float64 logits {exact}");
    assert!(float32 <= 2e-4, "max abs difference from transformers' float32 logits {float32}");

    let config = GenerationConfig {
        max_new_tokens: 16,
        sampler: Sampler::Greedy,
        eos_token_ids: vec![2],
        pad_token_id: 2,
        seed: 0,
    };
    let generation = generate(&model, &[prompt], &config, &[], None);
    let expected: Vec<i64> = ids(&reference["greedy"]).into_iter().map(i64::from).collect();
    assert_eq!(generation.completion_ids[0], expected);
}

#[test]
fn a_gguf_file_converts_to_a_directory_that_loads_the_same_model() {
    let cache = tempfile::tempdir().unwrap();
    let dir = policy_models::model::gguf_as_dir(&smollm2(), cache.path()).unwrap();
    // A second call finds the finished directory.
    assert_eq!(policy_models::model::gguf_as_dir(&smollm2(), cache.path()).unwrap(), dir);
    let device = Device::flex();
    let from_dir = CausalLm::load_dir(&dir, &device).unwrap();
    let from_file = CausalLm::load_gguf(&smollm2(), &device).unwrap();
    assert_eq!(from_dir.config(), from_file.config());
    let input = StepInput::from_padded(&[vec![1, 4093, 28, 905, 2]], &[vec![true; 5]]);
    let a = from_dir.forward(&input, &mut from_dir.new_cache()).into_data().try_to_vec::<f32>().unwrap();
    let b = from_file.forward(&input, &mut from_file.new_cache()).into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(a, b);
    let tokenizer = PolicyTokenizer::load_dir(&dir).unwrap();
    assert_eq!(tokenizer.encode("Hello world", true).unwrap(), vec![19556, 905]);
    assert_eq!(tokenizer.eos_ids.first(), Some(&2));
    let template = prompting::ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).unwrap();
    assert!(template.source().contains("<|im_start|>"));
}

/// A GGUF v3 file with one metadata string and one F32 tensor of `values` stored as `type_id`.
fn tiny_gguf(type_id: u32, values: &[f32]) -> Vec<u8> {
    tiny_gguf_shaped(type_id, &[values.len() as u64], values)
}

/// As [`tiny_gguf`], with the tensor's `ne` given.
fn tiny_gguf_shaped(type_id: u32, ne: &[u64], values: &[f32]) -> Vec<u8> {
    let string = |bytes: &mut Vec<u8>, text: &str| {
        bytes.extend((text.len() as u64).to_le_bytes());
        bytes.extend(text.as_bytes());
    };
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    string(&mut bytes, "general.architecture");
    bytes.extend(8u32.to_le_bytes());
    string(&mut bytes, "llama");
    string(&mut bytes, "token_embd.weight");
    bytes.extend((ne.len() as u32).to_le_bytes());
    ne.iter().for_each(|dim| bytes.extend(dim.to_le_bytes()));
    bytes.extend(type_id.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.resize(bytes.len().div_ceil(32) * 32, 0);
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    bytes
}

fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<GgufFile, LoadError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let result = GgufFile::open(&path);
    (dir, result)
}

#[test]
fn bad_gguf_files_get_errors_that_say_what_is_wrong() {
    let (_dir, file) = open_bytes(&tiny_gguf(0, &[1.0, 2.0, 3.0]));
    let file = file.unwrap();
    assert_eq!(file.dequantize("token_embd.weight").unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(file.tensors["token_embd.weight"].shape, vec![3]);

    let message = |result: Result<GgufFile, LoadError>| result.err().expect("an error").to_string();
    let full = tiny_gguf(0, &[1.0, 2.0, 3.0]);
    let truncated = message(open_bytes(&full[..full.len() - 4]).1);
    assert!(truncated.contains("token_embd.weight") && truncated.contains("truncated"), "{truncated}");
    let header_cut = message(open_bytes(&full[..30]).1);
    assert!(header_cut.contains("truncated"), "{header_cut}");
    let not_gguf = message(open_bytes(b"<html>not found</html>").1);
    assert!(not_gguf.contains("not a GGUF file"), "{not_gguf}");
    let unknown = message(open_bytes(&tiny_gguf(16, &[0.0; 64])).1);
    assert!(unknown.contains("IQ2_XXS") && unknown.contains("re-quantize"), "{unknown}");
    let mut future = full.clone();
    future[4..8].copy_from_slice(&4u32.to_le_bytes());
    let version = message(open_bytes(&future).1);
    assert!(version.contains("version 4"), "{version}");
    // Crafted headers: errors, never a panic, an abort or a huge allocation.
    let mut many = full.clone();
    many[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let count = message(open_bytes(&many).1);
    assert!(count.contains("tensor count") && count.contains("corrupt"), "{count}");
    let scalar = message(open_bytes(&tiny_gguf_shaped(0, &[], &[1.0])).1);
    assert!(scalar.contains("0 dimensions"), "{scalar}");
    let overflow = message(open_bytes(&tiny_gguf_shaped(0, &[u64::MAX / 2, 4], &[1.0])).1);
    assert!(overflow.contains("overflows"), "{overflow}");
    let past_end = message(open_bytes(&tiny_gguf_shaped(0, &[1 << 40], &[1.0])).1);
    assert!(past_end.contains("truncated"), "{past_end}");
    let mut nested = b"GGUF".to_vec();
    nested.extend(3u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    nested.extend(1u64.to_le_bytes());
    nested.extend(1u64.to_le_bytes());
    nested.extend(b"k");
    nested.extend(9u32.to_le_bytes());
    nested.extend(9u32.to_le_bytes());
    nested.extend(1u64.to_le_bytes());
    let arrays = message(open_bytes(&nested).1);
    assert!(arrays.contains("array of arrays"), "{arrays}");
}

#[test]
fn a_failed_conversion_leaves_nothing_in_the_cache() {
    let (dir, file) = open_bytes(&tiny_gguf(0, &[1.0, 2.0, 3.0]));
    drop(file);
    let cache = tempfile::tempdir().unwrap();
    let error =
        policy_models::model::gguf_as_dir(&dir.path().join("model.gguf"), cache.path()).unwrap_err().to_string();
    assert!(error.contains("llama.block_count") || error.contains("metadata key"), "{error}");
    let left: Vec<_> =
        std::fs::read_dir(cache.path().join("gguf")).map(|entries| entries.collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn unpermuting_inverts_llama_cpp_s_rotary_permutation() {
    // llama.cpp's `permute`: reshape(heads, 2, D/2, cols).swapaxes(1, 2), written out on row
    // indices: permuted row (h, i, j) holds original row (h, j, i).
    let (heads, rows, cols) = (3usize, 12usize, 2usize);
    let half = rows / heads / 2;
    let original: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
    let mut permuted = vec![0.0f32; rows * cols];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let to = h * 2 * half + 2 * i + j;
                let from = h * 2 * half + j * half + i;
                permuted[to * cols..(to + 1) * cols].copy_from_slice(&original[from * cols..(from + 1) * cols]);
            }
        }
    }
    assert_ne!(permuted, original);
    assert_eq!(policy_models::gguf::unpermute_rotary_rows(&permuted, rows, heads), original);
}

/// A GGUF value as the writer below encodes it.
enum Meta {
    Str(String),
    U32(u32),
    Bool(bool),
    Strings(Vec<String>),
    I32s(Vec<i32>),
}

/// A GGUF v3 file holding only `metadata` (no tensors).
fn gguf_bytes(metadata: &[(&str, Meta)]) -> Vec<u8> {
    fn string(bytes: &mut Vec<u8>, text: &str) {
        bytes.extend((text.len() as u64).to_le_bytes());
        bytes.extend(text.as_bytes());
    }
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut bytes, key);
        match value {
            Meta::Str(text) => {
                bytes.extend(8u32.to_le_bytes());
                string(&mut bytes, text);
            }
            Meta::U32(value) => {
                bytes.extend(4u32.to_le_bytes());
                bytes.extend(value.to_le_bytes());
            }
            Meta::Bool(value) => {
                bytes.extend(7u32.to_le_bytes());
                bytes.push(u8::from(*value));
            }
            Meta::Strings(items) => {
                bytes.extend(9u32.to_le_bytes());
                bytes.extend(8u32.to_le_bytes());
                bytes.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|item| string(&mut bytes, item));
            }
            Meta::I32s(items) => {
                bytes.extend(9u32.to_le_bytes());
                bytes.extend(5u32.to_le_bytes());
                bytes.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|item| bytes.extend(item.to_le_bytes()));
            }
        }
    }
    bytes
}

/// Writes `tokenizer` into GGUF metadata as llama.cpp's converter does (vocabulary by id, merges,
/// token types: 3 for special added tokens, 4 for other added tokens) with the pre-tokenizer name
/// `pre`, and reads it back through cotlab's GGUF tokenizer.
fn through_gguf(tokenizer: &PolicyTokenizer, pre: &str) -> Tokenizer {
    let json: Value = serde_json::from_str(&tokenizer.inner().to_string(false).unwrap()).unwrap();
    let mut tokens: Vec<(u64, String, i32)> = json["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(token, id)| (id.as_u64().unwrap(), token.clone(), 1))
        .collect();
    for added in json["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap();
        let kind = if added["special"].as_bool().unwrap() { 3 } else { 4 };
        match tokens.iter_mut().find(|(known, _, _)| *known == id) {
            Some(entry) => entry.2 = kind,
            None => tokens.push((id, added["content"].as_str().unwrap().to_string(), kind)),
        }
    }
    tokens.sort();
    assert!(tokens.iter().enumerate().all(|(index, (id, _, _))| index as u64 == *id), "ids are contiguous");
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|merge| match merge {
            Value::String(text) => text.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    let bos = tokenizer.prepended_bos();
    let mut metadata = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str(pre.into())),
        ("tokenizer.ggml.tokens", Meta::Strings(tokens.iter().map(|(_, token, _)| token.clone()).collect())),
        ("tokenizer.ggml.token_type", Meta::I32s(tokens.iter().map(|(_, _, kind)| *kind).collect())),
        ("tokenizer.ggml.merges", Meta::Strings(merges)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(bos.is_some())),
    ];
    if let Some(bos) = bos {
        metadata.push(("tokenizer.ggml.bos_token_id", Meta::U32(bos)));
    }
    let (_dir, file) = open_bytes(&gguf_bytes(&metadata));
    Tokenizer::from_str(&file.unwrap().tokenizer_json().unwrap().to_string()).unwrap()
}

/// The GGUF tokenizer of each pre-tokenizer named in the wild gives the token ids of the same
/// vocabulary loaded from its Hugging Face files (which the tokenizer tests hold to transformers):
/// GPT-2 (`gpt2`), Qwen2.5 (`qwen2`), Llama 3.2 (`llama-bpe`, with its BOS) and SmolLM2
/// (`smollm`).
#[test]
fn gguf_pre_tokenizers_match_the_hugging_face_tokenizers() {
    let questions = std::fs::read_to_string(shared().join("datasets/gsm8k/test.jsonl")).unwrap();
    let mut texts: Vec<String> = questions
        .lines()
        .take(40)
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["question"].as_str().unwrap().to_string())
        .collect();
    texts.extend(
        [
            "It's 12,345.67 dollars -- isn't it?",
            "café  naïve\n\n  spaces\tand tabs",
            "x=3*(4+5)/2; 1000000 1 22 333 4444",
            "<|im_start|>user\nHi<|im_end|>",
        ]
        .map(str::to_string),
    );
    for (folder, pre) in [
        ("gpt2", "gpt2"),
        ("qwen2.5-instruct", "qwen2"),
        ("llama-3.2-instruct", "llama-bpe"),
        ("smollm2-instruct", "smollm"),
    ] {
        let reference = PolicyTokenizer::load_dir(&shared().join("tokenizers").join(folder)).unwrap();
        let ours = through_gguf(&reference, pre);
        for text in &texts {
            let expected = reference.encode(text, true).unwrap();
            assert_eq!(ours.encode(text.as_str(), true).unwrap().get_ids(), expected.as_slice(), "{folder}: {text:?}");
        }
    }
}
