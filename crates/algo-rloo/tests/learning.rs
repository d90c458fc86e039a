//! RLOO raises a tiny random policy's reward well above chance on a toy reward within a few
//! dozen steps, driven only through the plug-in trait and its registry entry.

use burn::tensor::Device;
use policy_models::gpt_neo::{AttentionKind, GptNeoConfig};
use policy_models::{CausalLm, ModelConfig};
use rl_algos::rewards::{RewardFunction, RewardInput, WeightedRewards};
use rl_algos::{AlgorithmInputs, Environment, OptimSettings, PromptItem};

/// Share of completion tokens equal to "7" (chance 1/16).
struct TargetShare;

impl RewardFunction for TargetShare {
    fn name(&self) -> &str {
        "target_share"
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Vec<f32> {
        batch
            .iter()
            .map(|input| {
                let tokens: Vec<&str> = input.completion.split_whitespace().collect();
                tokens.iter().filter(|t| **t == "7").count() as f32 / tokens.len().max(1) as f32
            })
            .collect()
    }
}

#[test]
fn rloo_through_its_registry_entry_raises_the_reward() {
    let device = Device::flex().autodiff();
    device.seed(0);
    let config = ModelConfig::GptNeo(GptNeoConfig {
        vocab_size: 16,
        max_position_embeddings: 32,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 2,
        intermediate_size: None,
        attention_types: vec![(vec![AttentionKind::Global, AttentionKind::Local], 1)],
        window_size: 8,
        activation_function: "gelu_new".into(),
        layer_norm_epsilon: 1e-5,
        bos_token_id: None,
        eos_token_id: None,
        initializer_range: 0.02,
    });
    let inputs = AlgorithmInputs {
        policy: CausalLm::init(&config, &device).unwrap(),
        config: serde_json::json!({ "num_generations": 8, "max_completion_length": 4 }),
        optim: OptimSettings { learning_rate: 1e-2, total_steps: 40, ..OptimSettings::default() },
        seed: 0,
    };
    (algo_rloo::ENTRY.validate)(&inputs.config).unwrap();
    let mut rloo = (algo_rloo::ENTRY.build)(inputs).unwrap();
    let rewards = WeightedRewards::new(vec![(Box::new(TargetShare), 1.0)]);
    let decode = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
    let environment = Environment { decode: &decode, eos_token_ids: vec![], pad_token_id: 0, stop_strings: vec![], rewards: &rewards };
    let prompts: Vec<PromptItem> = (0..4).map(|i| PromptItem { prompt_ids: vec![2 + i, 3 + i, 4], prompt_text: String::new(), answer: String::new() }).collect();
    let history: Vec<_> = (0..40).map(|_| rloo.train_step(&prompts, &environment).unwrap()).collect();
    let mean = |slice: &[rl_algos::Metrics]| slice.iter().map(|m| m["reward"]).sum::<f64>() / slice.len() as f64;
    let (first, last) = (mean(&history[..3]), mean(&history[35..]));
    println!("RLOO toy reward: {first:.3} -> {last:.3} (chance 0.062)");
    assert!(last > 0.5 && last > first + 0.3, "reward {first:.3} -> {last:.3}");
    assert!((algo_rloo::ENTRY.validate)(&serde_json::json!({ "num_generations": 1 })).unwrap_err().contains("num_generations = 1"));
}
