//! Fixture reading shared by the integration tests.
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
