//! RLOO raises a tiny random policy's reward well above chance on a toy reward within a few
//! dozen steps, driven only through the plug-in trait and its registry entry; and every
//! registered algorithm's update is the same on one thread and on three.

use burn::tensor::Device;
use policy_models::gpt_neo::{AttentionKind, GptNeoConfig};
use policy_models::{CausalLm, ModelConfig, StepInput};
use rl_algos::rewards::{RewardFunction, RewardInput, WeightedRewards};
use rl_algos::{AlgorithmEntry, AlgorithmInputs, Environment, Metrics, OptimSettings, PromptItem};

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

/// burn's parameter initialisation draws from a process-wide generator: the tests take turns
/// seeding it, so each starts from the same weights every run.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The tiny GPT-Neo every test here starts from, initialised from `seed`.
fn seeded_policy(seed: u64, device: &Device) -> CausalLm {
    let _turn = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
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
    CausalLm::init(&config, device).unwrap()
}

/// `steps` training steps on four toy prompts rewarded by [`TargetShare`].
fn train_on_target_share(algorithm: &mut dyn rl_algos::RlAlgorithm, steps: usize) -> Vec<Metrics> {
    let rewards = WeightedRewards::new(vec![(Box::new(TargetShare), 1.0)]);
    let decode = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
    let environment = Environment {
        decode: &decode,
        eos_token_ids: vec![],
        pad_token_id: 0,
        stop_strings: vec![],
        rewards: &rewards,
    };
    let prompts: Vec<PromptItem> = (0..4)
        .map(|i| PromptItem { prompt_ids: vec![2 + i, 3 + i, 4], prompt_text: String::new(), answer: String::new() })
        .collect();
    (0..steps).map(|_| algorithm.train_step(&prompts, &environment).unwrap()).collect()
}

#[test]
fn rloo_through_its_registry_entry_raises_the_reward() {
    let device = Device::flex().autodiff();
    let inputs = AlgorithmInputs {
        policy: seeded_policy(0, &device),
        config: serde_json::json!({ "num_generations": 8, "max_completion_length": 4 }),
        optim: OptimSettings { learning_rate: 1e-2, total_steps: 40, ..OptimSettings::default() },
        seed: 0,
    };
    (algo_rloo::ENTRY.validate)(&inputs.config).unwrap();
    let mut rloo = (algo_rloo::ENTRY.build)(inputs).unwrap();
    let history = train_on_target_share(rloo.as_mut(), 40);
    let mean = |slice: &[rl_algos::Metrics]| slice.iter().map(|m| m["reward"]).sum::<f64>() / slice.len() as f64;
    let (first, last) = (mean(&history[..3]), mean(&history[35..]));
    println!("RLOO toy reward: {first:.3} -> {last:.3} (chance 0.062)");
    assert!(last > 0.5 && last > first + 0.3, "reward {first:.3} -> {last:.3}");
    assert!(
        (algo_rloo::ENTRY.validate)(&serde_json::json!({ "num_generations": 1 }))
            .unwrap_err()
            .contains("num_generations = 1")
    );
    assert!(
        (algo_rloo::ENTRY.validate)(&serde_json::json!({ "epsilon": 1.5 })).unwrap_err().contains("rloo.epsilon = 1.5")
    );
    let unknown = (algo_rloo::ENTRY.validate)(&serde_json::json!({ "kl_in": "logits" })).unwrap_err();
    assert!(unknown.contains("logits") && unknown.contains("reward"), "{unknown}");
    // TRL's defaults: the KL in the reward at beta 0.05, so the step logs a KL.
    assert!(history.iter().all(|m| m["kl"].is_finite()) && history.iter().any(|m| m["kl"] != 0.0));
    assert!(history.iter().all(|m| m["clip_ratio/region_mean"] == 0.0), "one update per rollout: the ratio is 1");
}

/// RLOO makes one update per step, so its schedule spans the run's steps and each step's
/// update runs at the schedule's rate for that step.
#[test]
fn rloo_schedule_takes_one_optimizer_step_per_step() {
    let device = Device::flex().autodiff();
    let config = serde_json::json!({ "num_generations": 4, "max_completion_length": 3 });
    let settings =
        OptimSettings { learning_rate: 1e-2, min_lr_ratio: 0.0, warmup_ratio: 0.3, ..OptimSettings::default() };
    let optim = algo_rloo::ENTRY.run_optim(&config, &settings, 4, 4).unwrap();
    assert_eq!(optim.total_steps, 4);
    let schedule = optim.schedule();
    let mut rloo =
        (algo_rloo::ENTRY.build)(AlgorithmInputs { policy: seeded_policy(0, &device), config, optim, seed: 0 })
            .unwrap();
    let rewards = WeightedRewards::new(vec![(Box::new(TargetShare), 1.0)]);
    let decode = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
    let environment = Environment {
        decode: &decode,
        eos_token_ids: vec![],
        pad_token_id: 0,
        stop_strings: vec![],
        rewards: &rewards,
    };
    let prompts: Vec<PromptItem> = (0..4)
        .map(|i| PromptItem { prompt_ids: vec![2 + i, 3 + i, 4], prompt_text: String::new(), answer: String::new() })
        .collect();
    for step in 0..4 {
        let metrics = rloo.train_step(&prompts, &environment).unwrap();
        assert_eq!(metrics["learning_rate"], schedule.learning_rate_at(step), "step {step}");
    }
}

fn step_with_threads(
    entry: &AlgorithmEntry,
    config: &serde_json::Value,
    start: &std::path::Path,
    threads: usize,
) -> (Vec<f32>, Metrics) {
    let device = Device::flex().autodiff();
    let rewards = WeightedRewards::new(vec![(Box::new(TargetShare), 1.0)]);
    let decode = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
    let environment = Environment {
        decode: &decode,
        eos_token_ids: vec![],
        pad_token_id: 0,
        stop_strings: vec![],
        rewards: &rewards,
    };
    // Prompts of different lengths, so shards pad differently from the whole batch.
    let prompts: Vec<PromptItem> = (0..4)
        .map(|i| PromptItem {
            prompt_ids: (0..2 + i as i64).map(|t| 2 + t).collect(),
            prompt_text: format!("p{i}"),
            answer: "7".to_string(),
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let inputs = AlgorithmInputs {
            policy: CausalLm::load_dir(start, &device).unwrap(),
            config: config.clone(),
            optim: OptimSettings { learning_rate: 1e-2, total_steps: 2, warmup_ratio: 0.0, ..OptimSettings::default() },
            seed: 4,
        };
        let mut algorithm = (entry.build)(inputs).unwrap();
        let metrics = algorithm.train_step(&prompts, &environment).unwrap();
        let probe = StepInput::from_padded(&[vec![2, 3, 4]], &[vec![true; 3]]);
        let policy = algorithm.policy();
        (policy.forward(&probe, &mut policy.new_cache()).into_data().try_to_vec::<f32>().unwrap(), metrics)
    })
}

/// Every registered algorithm's update is independent of the number of threads: on the CPU a
/// training batch runs as one shard of rows per thread (`policy_models::optim::sharded_backward`),
/// and rollouts as one sub-batch per thread, yet one thread and three give the same step. (Here
/// because this crate sees all three algorithms: GRPO and PPO from rl-algos, and RLOO.)
#[test]
fn one_thread_and_three_give_the_same_update() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    seeded_policy(1, &device).save_dir(dir.path(), None).unwrap();
    let cases = [
        (
            rl_algos::grpo::ENTRY,
            serde_json::json!({ "num_generations": 4, "max_completion_length": 4, "beta": 0.04, "num_iterations": 2 }),
        ),
        (
            rl_algos::ppo::ENTRY,
            serde_json::json!({ "max_completion_length": 4, "num_ppo_epochs": 2, "num_mini_batches": 1 }),
        ),
        (
            rl_algos::ppo::ENTRY,
            serde_json::json!({ "max_completion_length": 4, "num_ppo_epochs": 2, "num_mini_batches": 2, "value_model": "separate" }),
        ),
        (algo_rloo::ENTRY, serde_json::json!({ "num_generations": 4, "max_completion_length": 4, "beta": 0.04 })),
        (
            algo_rloo::ENTRY,
            serde_json::json!({ "num_generations": 4, "max_completion_length": 4, "beta": 0.04, "kl_in": "loss" }),
        ),
    ];
    for (entry, config) in cases {
        let (one, metrics_one) = step_with_threads(&entry, &config, dir.path(), 1);
        let (three, metrics_three) = step_with_threads(&entry, &config, dir.path(), 3);
        let worst = one.iter().zip(&three).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{}: logits after one step differ by {worst}", entry.name);
        assert_eq!(metrics_one["reward"], metrics_three["reward"], "{}: the rollouts differ", entry.name);
        for (name, value) in &metrics_one {
            if name.contains("time") || name.contains("per_second") {
                continue;
            }
            let other = metrics_three[name];
            assert!(
                (value - other).abs() <= 1e-4 * (1.0 + value.abs()),
                "{}: {name} {value} with one thread, {other} with three",
                entry.name
            );
        }
    }
}

/// A token budget splits the update into micro-batches without changing it: one micro-batch
/// (`gradient_accumulation_steps = 1`) and the budget's split (one row per micro-batch, and two)
/// give the same step, for GRPO's token-mean and sequence-mean losses and for RLOO.
#[test]
fn a_token_budget_splits_micro_batches_without_changing_the_update() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    seeded_policy(2, &device).save_dir(dir.path(), None).unwrap();
    let grpo = |loss_type: &str| serde_json::json!({ "num_generations": 4, "max_completion_length": 4, "beta": 0.04, "loss_type": loss_type });
    let cases = [
        (rl_algos::grpo::ENTRY, grpo("dapo")),
        (rl_algos::grpo::ENTRY, grpo("grpo")),
        (
            algo_rloo::ENTRY,
            serde_json::json!({ "num_generations": 4, "max_completion_length": 4, "beta": 0.04, "normalize_advantages": true }),
        ),
        (
            algo_rloo::ENTRY,
            serde_json::json!({ "num_generations": 4, "max_completion_length": 4, "beta": 0.04, "kl_in": "loss" }),
        ),
    ];
    for (entry, config) in cases {
        let with = |key: &str, value: usize| {
            let mut config = config.clone();
            config[key] = value.into();
            step_with_threads(&entry, &config, dir.path(), 2)
        };
        let (whole, metrics_whole) = with("gradient_accumulation_steps", 1);
        // Rows are at most 5 prompt + 4 completion tokens: a budget of 1 token gives one row per
        // micro-batch (16 of them), 18 tokens two rows.
        for budget in [1, 18] {
            let (split, metrics_split) = with("max_tokens_per_micro_batch", budget);
            let worst = whole.iter().zip(&split).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(
                worst < 1e-5,
                "{} {config}: logits after one step differ by {worst} with a budget of {budget}",
                entry.name
            );
            for name in ["loss", "kl", "entropy", "grad_norm"] {
                let (a, b) = (metrics_whole[name], metrics_split[name]);
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "{} {config}: {name} {a} in one micro-batch, {b} with a budget of {budget}",
                    entry.name
                );
            }
        }
    }
}

/// A tiny Llama: the shared decoder, which takes the shared-prefix path (GPT-Neo does not).
fn tiny_llama(device: &Device) -> CausalLm {
    let _turn = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(3);
    let mut config = policy_models::presets::Preset::TinyLlama.config(16, 0, 32);
    if let ModelConfig::Llama(llama) = &mut config {
        llama.hidden_size = 32;
        llama.intermediate_size = 64;
        llama.num_hidden_layers = 2;
        llama.num_attention_heads = 2;
        llama.num_key_value_heads = Some(1);
    }
    CausalLm::init(&config, device).unwrap()
}

/// Running each prompt once (`share_prompt_prefix`) changes nothing but the cost: after one
/// RLOO step with a KL term, over prompts of different lengths and a token budget that splits
/// groups, the policy's logits and the metrics equal the full path's.
#[test]
fn shared_prompt_prefixes_give_the_same_update() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    tiny_llama(&device).save_dir(dir.path(), None).unwrap();
    let rewards = WeightedRewards::new(vec![(Box::new(TargetShare), 1.0)]);
    let decode = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
    let environment = Environment {
        decode: &decode,
        eos_token_ids: vec![5],
        pad_token_id: 0,
        stop_strings: vec![],
        rewards: &rewards,
    };
    let prompts: Vec<PromptItem> = (0..4)
        .map(|i| PromptItem {
            prompt_ids: (0..=i).map(|t| 2 + t + i).collect(),
            prompt_text: String::new(),
            answer: String::new(),
        })
        .collect();
    let probe = StepInput::from_padded(&[vec![2, 3, 4, 7, 7]], &[vec![true; 5]]);
    let logits =
        |policy: &CausalLm| policy.forward(&probe, &mut policy.new_cache()).into_data().try_to_vec::<f32>().unwrap();
    let step = |share: bool| {
        let config = serde_json::json!({
            "num_generations": 3, "max_completion_length": 6, "beta": 0.1, "max_tokens_per_micro_batch": 20, "share_prompt_prefix": share
        });
        let optim = OptimSettings { learning_rate: 1e-2, total_steps: 1, ..OptimSettings::default() };
        let inputs =
            AlgorithmInputs { policy: CausalLm::load_dir(dir.path(), &device).unwrap(), config, optim, seed: 9 };
        let mut rloo = (algo_rloo::ENTRY.build)(inputs).unwrap();
        let metrics = rloo.train_step(&prompts, &environment).unwrap();
        (logits(rloo.policy()), metrics)
    };
    let start = logits(&CausalLm::load_dir(dir.path(), &device).unwrap());
    let ((shared, shared_metrics), (full, full_metrics)) = (step(true), step(false));
    let moved = full.iter().zip(&start).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "the update moved the logits by only {moved}");
    let worst = shared.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "logits differ by {worst}");
    for key in ["loss", "kl", "entropy", "grad_norm"] {
        let (a, b) = (shared_metrics[key], full_metrics[key]);
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{key}: {a} vs {b}");
    }
}

/// Mixed precision (`optim.dtype = "bf16"`), with the KL in the loss (the reference scored in
/// every shard) and in the reward: RLOO learns on bf16 copies of f32 weights, which stay f32.
#[test]
fn rloo_learns_in_bf16_on_f32_master_weights() {
    let device = Device::flex().autodiff();
    for kl_in in ["loss", "reward"] {
        let inputs = AlgorithmInputs {
            policy: seeded_policy(0, &device),
            config: serde_json::json!({ "num_generations": 8, "max_completion_length": 4, "kl_in": kl_in }),
            optim: OptimSettings {
                learning_rate: 1e-2,
                total_steps: 40,
                dtype: policy_models::optim::TrainDtype::Bf16,
                ..OptimSettings::default()
            },
            seed: 0,
        };
        let mut rloo = (algo_rloo::ENTRY.build)(inputs).unwrap();
        let history = train_on_target_share(rloo.as_mut(), 40);
        let mean = |slice: &[Metrics]| slice.iter().map(|m| m["reward"]).sum::<f64>() / slice.len() as f64;
        let (first, last) = (mean(&history[..3]), mean(&history[35..]));
        println!("RLOO bf16 (KL in the {kl_in}) toy reward: {first:.3} -> {last:.3}");
        assert!(last > 0.5 && last > first + 0.3, "KL in the {kl_in}: reward {first:.3} -> {last:.3}");
        assert!(history.iter().all(|m| m["kl"].is_finite()) && history.iter().any(|m| m["kl"] != 0.0));
        assert_eq!(rloo.policy().compute_dtype(), burn::tensor::FloatDType::F32, "the weights stay f32");
    }
}
