//! RLOO: REINFORCE with the leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024),
//! as a cotlab algorithm crate. It is the worked example of the README's "Adding an algorithm":
//! a config with `validate()`, an [`RlAlgorithm`] implementation, and an [`ENTRY`] that the study
//! runner registers with one line.
//!
//! Per step: k completions per prompt; each completion's advantage is its reward minus the mean
//! reward of the *other* k - 1 completions of its prompt; the loss is
//! -advantage x log pi(token) averaged over completion tokens (plus beta x the k3 KL to the
//! frozen starting policy when beta > 0).
//!
//! Legend: `N` completions (prompts x k), `T` padded completion length.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use policy_models::CausalLm;
use policy_models::generate::Sampler;
use policy_models::optim::{AdamW, apply_gradients, shard_ranges, sharded_backward};
use rl_algos::algorithm::{CheckpointState, mean_std, parse_config};
use rl_algos::{AlgorithmEntry, AlgorithmInputs, Environment, Metrics, OptimSettings, PromptItem, RlAlgorithm, RlError, RolloutShape, rollout};
use serde::{Deserialize, Serialize};

/// RLOO settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlooConfig {
    /// Completions per prompt (k). Default 4; at least 2, since each baseline uses the others.
    pub num_generations: usize,
    /// Most tokens per completion. Default 128.
    pub max_completion_length: usize,
    /// Sampling temperature. Default 1.0.
    pub temperature: f32,
    /// Weight of the k3 KL to the starting policy. Default 0.0.
    pub beta: f64,
    /// Split the update's completions into this many micro-batches, accumulating gradients
    /// (the loss is a token mean over the whole batch, so the update is the same). Default: as
    /// many as `max_tokens_per_micro_batch` asks.
    pub gradient_accumulation_steps: Option<usize>,
    /// When `gradient_accumulation_steps` is not set: the most tokens (rows x padded length, a
    /// shared prompt counted once per forward pass) per micro-batch. Default 1024, as GRPO's.
    pub max_tokens_per_micro_batch: usize,
    /// Run each prompt once in the training and reference forwards, its k completions attending
    /// over it (`policy_models::prefix`: the same numbers in fewer positions). Default true.
    pub share_prompt_prefix: bool,
}

impl Default for RlooConfig {
    fn default() -> Self {
        Self {
            num_generations: 4,
            max_completion_length: 128,
            temperature: 1.0,
            beta: 0.0,
            gradient_accumulation_steps: None,
            max_tokens_per_micro_batch: rollout::DEFAULT_MAX_TOKENS_PER_MICRO_BATCH,
            share_prompt_prefix: true,
        }
    }
}

impl RlooConfig {
    /// Checks the settings; each message names the value and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_generations < 2 {
            return Err(format!("rloo.num_generations = {}: the leave-one-out baseline needs at least 2", self.num_generations));
        }
        if self.max_completion_length == 0 || !(self.temperature > 0.0) || self.beta < 0.0 {
            return Err("rloo.max_completion_length must be at least 1, temperature positive and beta >= 0".to_string());
        }
        if self.gradient_accumulation_steps == Some(0) || self.max_tokens_per_micro_batch == 0 {
            return Err("rloo.gradient_accumulation_steps and max_tokens_per_micro_batch must be at least 1".to_string());
        }
        Ok(())
    }
}

/// Leave-one-out advantages of rewards laid out group by group: r_i - mean(r_j, j != i).
pub fn leave_one_out_advantages(rewards: &[f32], k: usize) -> Vec<f32> {
    rewards
        .chunks(k)
        .flat_map(|group| {
            let sum: f32 = group.iter().sum();
            let others = (group.len() - 1).max(1) as f32;
            group.iter().map(move |&r| r - (sum - r) / others)
        })
        .collect()
}

/// The registry entry: the one line the study runner adds is `algo_rloo::ENTRY`.
pub const ENTRY: AlgorithmEntry = AlgorithmEntry { name: "rloo", validate, optimizer_steps_per_step, rollout_shape, build, resume };

fn validate(value: &serde_json::Value) -> Result<(), String> {
    parse_config::<RlooConfig>("rloo", value)?.validate()
}

/// One update per step, over the whole batch.
fn optimizer_steps_per_step(value: &serde_json::Value, _prompts_per_step: usize) -> Result<u64, String> {
    validate(value).map(|()| 1)
}

/// `num_generations` completions per prompt, one pass over them.
fn rollout_shape(value: &serde_json::Value) -> Result<RolloutShape, String> {
    let config = parse_config::<RlooConfig>("rloo", value)?;
    config.validate()?;
    Ok(RolloutShape { completions_per_prompt: config.num_generations, max_completion_length: config.max_completion_length, max_sampling_rounds: 1, training_passes: 1 })
}

fn build(inputs: AlgorithmInputs) -> Result<Box<dyn RlAlgorithm>, RlError> {
    let config = parse_config::<RlooConfig>("rloo", &inputs.config).map_err(RlError::Config)?;
    Ok(Box::new(Rloo::new(inputs.policy, config, inputs.optim, inputs.seed)?))
}

fn resume(inputs: AlgorithmInputs, dir: &Path) -> Result<Box<dyn RlAlgorithm>, RlError> {
    let config = parse_config::<RlooConfig>("rloo", &inputs.config).map_err(RlError::Config)?;
    let state = CheckpointState::read(dir)?;
    let policy = rl_algos::algorithm::checkpoint_policy(&inputs.policy, dir)?;
    let mut rloo = Rloo::new(inputs.policy, config, inputs.optim, state.seed)?;
    rloo.optimizer = AdamW::load(rloo.optim.adamw, &policy, &dir.join("optimizer.safetensors"))?;
    rloo.policy = Some(policy);
    rloo.steps = state.steps;
    Ok(Box::new(rloo))
}

/// RLOO training state.
pub struct Rloo {
    config: RlooConfig,
    optim: OptimSettings,
    policy: Option<CausalLm>,
    reference: Option<CausalLm>,
    optimizer: AdamW,
    steps: u64,
    seed: u64,
}

impl Rloo {
    /// Starts RLOO on `policy` (on an autodiff device).
    pub fn new(policy: CausalLm, config: RlooConfig, optim: OptimSettings, seed: u64) -> Result<Self, RlError> {
        config.validate().map_err(RlError::Config)?;
        optim.validate().map_err(RlError::Config)?;
        let reference = (config.beta > 0.0).then(|| rl_algos::algorithm::reference_policy(&policy));
        Ok(Self { optimizer: AdamW::new(optim.adamw), config, optim, policy: Some(policy), reference, steps: 0, seed })
    }
}

impl RlAlgorithm for Rloo {
    fn name(&self) -> &'static str {
        "rloo"
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn policy(&self) -> &CausalLm {
        self.policy.as_ref().expect("the policy is present between steps")
    }

    fn into_policy(self: Box<Self>) -> CausalLm {
        self.policy.expect("the policy is present between steps")
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<(), RlError> {
        self.policy().save_dir(&dir.join("policy"), None)?;
        self.optimizer.save(self.policy(), &dir.join("optimizer.safetensors"))?;
        CheckpointState { steps: self.steps, seed: self.seed }.write(dir)
    }

    fn train_step(&mut self, prompts: &[PromptItem], environment: &Environment<'_>) -> Result<Metrics, RlError> {
        let started = Instant::now();
        let k = self.config.num_generations;
        let policy = self.policy.take().expect("the policy is present between steps");
        let device = policy.devices().into_iter().next().expect("the policy has parameters");
        // 1. Rollout on a copy without autodiff.
        let sampler = Sampler::Sample { temperature: self.config.temperature, top_k: None, top_p: None };
        let seed = self.seed ^ self.steps.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let rollout = rollout::sample(&policy.valid(), prompts, k, self.config.max_completion_length, sampler, environment, seed);
        // 2. Rewards and leave-one-out advantages.
        let scored = rollout::reward(&rollout, prompts, environment);
        let advantages = leave_one_out_advantages(&scored.total, k);
        let mut metrics = Metrics::new();
        rollout::rollout_metrics(&rollout, &scored, &mut metrics);
        metrics.insert("reward_std".to_string(), mean_std(&scored.total).1);
        // 3. The REINFORCE loss over completion tokens, with the optional KL penalty.
        let completion_len = rollout.completion_len();
        let mask = rollout::loss_mask(&rollout, false, &device);
        let count = rollout.len();
        let advantages = Tensor::<1>::from_data(TensorData::new(advantages, [count]), &device).reshape([count, 1]);
        let tokens = f64::from(mask.clone().sum().into_scalar::<f32>()).max(1.0);
        let (temperature, beta) = (self.config.temperature, self.config.beta as f32);
        let reference = self.reference.as_ref();
        // Micro-batches of rows (bounded by the token budget), each one shard of rows per thread
        // on the CPU; each loss is its share of the whole batch's token mean.
        let (pad, share) = (environment.pad_token_id, self.config.share_prompt_prefix);
        // A micro-batch's tokens: what its shards' forward passes run.
        let micro_tokens = |rows: std::ops::Range<usize>| {
            let shards = shard_ranges(&policy, rows.len());
            shards.into_iter().map(|shard| rollout::scoring_positions(&rollout, prompts, rows.start + shard.start..rows.start + shard.end, share)).sum()
        };
        let micro = rollout::micro_batch_rows_by(count, self.config.gradient_accumulation_steps, self.config.max_tokens_per_micro_batch, micro_tokens);
        let mut accumulator = burn::optim::GradientsAccumulator::new();
        let (mut loss, mut shards) = (0.0, Vec::new());
        for start in (0..count).step_by(micro) {
            let shard = |policy: &CausalLm, shard_rows: std::ops::Range<usize>| {
                let rows = start + shard_rows.start..start + shard_rows.end;
                let sub = rollout.select(&rows.clone().collect::<Vec<usize>>());
                let pick = |t: &Tensor<2>| t.clone().slice([rows.clone(), 0..completion_len]);
                let sub_mask = pick(&mask);
                let (logps, entropies) = rollout::completion_scores(policy, &sub, prompts, pad, share, temperature);
                let mut per_token = -(logps.clone() * advantages.clone().slice([rows.clone(), 0..1]));
                let mut kl_sum = 0.0;
                if let Some(reference) = reference {
                    let reference_logps = Tensor::from_inner(rollout::completion_scores(reference, &sub, prompts, pad, share, temperature).0);
                    let difference = reference_logps - logps;
                    let kl = difference.clone().exp() - difference - 1.0;
                    kl_sum = f64::from((kl.clone().detach() * sub_mask.clone()).sum().into_scalar::<f32>());
                    per_token = per_token + kl * beta;
                }
                let loss = ((per_token * sub_mask.clone()).sum() / tokens as f32).reshape([1]);
                let entropy_sum = f64::from((entropies.detach() * sub_mask).sum().into_scalar::<f32>());
                (loss, (kl_sum, entropy_sum))
            };
            let (micro_loss, grads, micro_shards) = match sharded_backward(&policy, (start + micro).min(count) - start, shard) {
                Ok(computed) => computed,
                Err(bad) => {
                    self.policy = Some(policy);
                    return Err(RlError::NotFinite { step: self.steps + 1, quantity: bad.quantity().to_string(), value: bad.value() });
                }
            };
            loss += micro_loss;
            shards.extend(micro_shards);
            accumulator.accumulate(&policy, grads);
        }
        let grads = accumulator.grads();
        let kl_mean = shards.iter().map(|(kl, _)| kl).sum::<f64>() / tokens;
        let entropy = shards.iter().map(|(_, entropy)| entropy).sum::<f64>() / tokens;
        // 4. The update.
        let learning_rate = self.optim.schedule().learning_rate_at(self.optimizer.steps());
        let (policy, stats) = match apply_gradients(policy, grads, loss, &mut self.optimizer, self.optim.max_grad_norm, learning_rate) {
            Ok(updated) => updated,
            Err((policy, bad)) => {
                self.policy = Some(policy);
                return Err(RlError::NotFinite { step: self.steps + 1, quantity: bad.quantity().to_string(), value: bad.value() });
            }
        };
        self.policy = Some(policy);
        self.steps += 1;
        for (name, value) in [
            ("loss", stats.loss),
            ("grad_norm", stats.grad_norm),
            ("update_norm", stats.update_norm),
            ("learning_rate", learning_rate),
            ("kl", kl_mean),
            ("entropy", entropy),
        ] {
            metrics.insert(name.to_string(), value);
        }
        let seconds = started.elapsed().as_secs_f64();
        metrics.insert("step_time".to_string(), seconds);
        metrics.insert("tokens_per_second".to_string(), rollout.lengths().iter().sum::<usize>() as f64 / seconds.max(1e-9));
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_one_out_baselines_exclude_the_sample_itself() {
        // Group [1, 0, 0, 1]: the baseline of the first is (0 + 0 + 1) / 3.
        let advantages = leave_one_out_advantages(&[1.0, 0.0, 0.0, 1.0, 2.0, 2.0], 2);
        assert_eq!(advantages, vec![1.0, -1.0, -1.0, 1.0, 0.0, 0.0]);
        let four = leave_one_out_advantages(&[1.0, 0.0, 0.0, 1.0], 4);
        assert!((four[0] - (1.0 - 1.0 / 3.0)).abs() < 1e-6);
        // They sum to zero within a group (k / (k - 1) times the centred reward).
        assert!(four.iter().sum::<f32>().abs() < 1e-6);
    }
}
