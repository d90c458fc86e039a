//! Fixture reading and toy data shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses part of the shared fixture code")]

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize)]
pub struct Reference {
    pub input_ids: Vec<Vec<i64>>,
    pub attention_mask: Vec<Vec<i64>>,
    pub logits: Vec<Vec<Vec<f32>>>,
    pub greedy_new_tokens: Vec<Vec<i64>>,
}

pub const CASES: [&str; 4] = ["gpt_neo", "qwen2_tied", "qwen2_bf16_sharded", "llama3"];

pub fn fixture(name: &str) -> (PathBuf, Reference) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let reference = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    (dir, reference)
}

pub fn mask(reference: &Reference) -> Vec<Vec<bool>> {
    reference.attention_mask.iter().map(|row| row.iter().map(|&m| m == 1).collect()).collect()
}

/// A BPE tokenizer of 200 tokens trained on synthetic arithmetic (`train_size` problems drawn
/// from `seed`, one or two operations) and the problems as SFT examples: `Q: ..\nA:` prompts,
/// worked solutions ending in `#### N` and the end-of-sequence token.
pub fn arithmetic_sft_data(
    train_size: usize,
    seed: u64,
) -> (policy_models::PolicyTokenizer, Vec<policy_models::train::SftExample>) {
    use tasks::synthetic::{SyntheticConfig, generate};
    let task = generate(&SyntheticConfig { train_size, test_size: 10, max_operations: 2, seed, ..Default::default() })
        .unwrap();
    let texts = task.train.problems.iter().map(|p| format!("Q: {}\nA: {}\n#### {}", p.question, p.solution, p.answer));
    let tokenizer = policy_models::presets::train_tokenizer(texts.collect::<Vec<_>>().into_iter(), 200).unwrap();
    let eos = i64::from(tokenizer.eos_ids[0]);
    let encode =
        |text: &str| -> Vec<i64> { tokenizer.encode(text, false).unwrap().into_iter().map(i64::from).collect() };
    let examples = task
        .train
        .problems
        .iter()
        .map(|p| {
            let mut completion = encode(&format!("{}\n#### {}", p.solution, p.answer));
            completion.push(eos);
            policy_models::train::SftExample {
                prompt_ids: encode(&format!("Q: {}\nA:", p.question)),
                completion_ids: completion,
            }
        })
        .collect();
    (tokenizer, examples)
}
