//! One GRPO step on SmolLM2-135M-Instruct at TRL's scale (8 prompts x 8 completions, 64 new
//! tokens, `loss_type = dapo`, `beta = 0`), for measuring peak memory (issue #16):
//!
//! ```text
//! cargo build --release -p rl-algos --example grpo_memory
//! /usr/bin/time -v target/release/examples/grpo_memory [model.gguf | checkpoint dir] [grpo config JSON]
//! ```
//!
//! Prints the step's metrics, its time and the process's peak resident memory (VmHWM). The
//! optional JSON is merged into the GRPO config (e.g. `{"gradient_accumulation_steps": 16}`).

use std::time::Instant;

use burn::tensor::Device;
use policy_models::{CausalLm, ModelSource, PolicyTokenizer};
use rl_algos::rewards::{RewardFunction, RewardInput, WeightedRewards};
use rl_algos::{AlgorithmInputs, Environment, OptimSettings, PromptItem};

const MODEL: &str = "/work/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Completion length in characters mod 3: varies within a group, so advantages are not zero.
struct LengthMod3;

impl RewardFunction for LengthMod3 {
    fn name(&self) -> &str {
        "length_mod_3"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Vec<f32> {
        batch.iter().map(|input| (input.completion.chars().count() % 3) as f32).collect()
    }
}

/// Peak resident set size of this process so far, in MB (Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = ModelSource::parse(args.get(1).map_or(MODEL, String::as_str))?.resolve()?;
    let device = Device::flex().autodiff();
    let policy = CausalLm::load_dir(&dir, &device)?;
    let tokenizer = PolicyTokenizer::load_dir(&dir)?;
    println!("model loaded: peak RSS {:.0} MB", peak_rss_mb().unwrap_or(f64::NAN));

    // Eight prompts of about 130 tokens: with 64 new tokens, rows of about 200 tokens.
    let story = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. \
                 Weng earns $12 an hour for babysitting; yesterday she did 50 minutes of babysitting. \
                 Betty is saving money for a new wallet which costs $100; she has only half of the money she needs.";
    let prompts: Vec<PromptItem> = (0..8)
        .map(|i| {
            let text =
                format!("Question {i}: {story} {story} How many are there in all, in case {i}? Answer step by step.");
            let ids = tokenizer.encode(&text, true).expect("encodes").into_iter().map(i64::from).collect();
            PromptItem { prompt_ids: ids, prompt_text: text, answer: "72".to_string() }
        })
        .collect();
    println!("prompt lengths: {:?}", prompts.iter().map(|p| p.prompt_ids.len()).collect::<Vec<_>>());

    let mut config =
        serde_json::json!({ "num_generations": 8, "max_completion_length": 64, "loss_type": "dapo", "beta": 0.0 });
    if let Some(extra) = args.get(2) {
        let extra: serde_json::Value = serde_json::from_str(extra)?;
        for (key, value) in extra.as_object().ok_or("the second argument must be a JSON object")? {
            config[key] = value.clone();
        }
    }
    println!("grpo config: {config}");
    let inputs = AlgorithmInputs {
        policy,
        config,
        optim: OptimSettings { learning_rate: 1e-6, ..OptimSettings::default() },
        seed: 0,
    };
    let mut algorithm = (rl_algos::grpo::ENTRY.build)(inputs)?;
    let rewards = WeightedRewards::new(vec![(Box::new(LengthMod3), 1.0)]);
    let decode =
        |ids: &[i64]| tokenizer.decode(&ids.iter().map(|&id| id as u32).collect::<Vec<_>>(), true).unwrap_or_default();
    // No end-of-sequence token: every completion runs to 64 tokens (the largest batch).
    let environment = Environment {
        decode: &decode,
        eos_token_ids: vec![],
        pad_token_id: tokenizer.pad_id.unwrap_or(0).into(),
        stop_strings: vec![],
        rewards: &rewards,
    };
    let started = Instant::now();
    let metrics = algorithm.train_step(&prompts, &environment)?;
    println!("step: {:.1} s", started.elapsed().as_secs_f64());
    for key in ["loss", "grad_norm", "reward", "reward_std", "entropy", "completions/mean_length", "step_time"] {
        if let Some(value) = metrics.get(key) {
            println!("{key}: {value}");
        }
    }
    println!("peak RSS: {:.0} MB", peak_rss_mb().unwrap_or(f64::NAN));
    Ok(())
}
