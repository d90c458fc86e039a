//! RLOO: REINFORCE with the leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024),
//! as a cotlab algorithm crate. It is the worked example of `docs/algorithms.md`:
//! a config with `validate()`, an [`RlAlgorithm`] implementation, and an [`ENTRY`] that the study
//! runner registers with one line.
//!
//! Per step: k completions per prompt, scored; then one of two variants, chosen by `kl_in`:
//!
//! - `kl_in = "reward"` (the default; TRL 1.16's `RLOOTrainer`): the k1 KL to the frozen starting
//!   policy, summed over each completion's tokens, is taken off its reward,
//!   r_i <- r_i - beta x sum_t (log pi_old(y_t) - log pi_ref(y_t)), *before* the baseline; the
//!   advantage is A_i = r_i - mean(r_j, j != i) over the prompt's k completions (optionally
//!   normalised over the batch: (A - mean) / (std + 1e-4), `normalize_advantages`); the loss is
//!   per *sequence*, with one ratio per completion, rho_i = exp(sum_t log pi - sum_t log pi_old),
//!   mean_i -min(rho_i A_i, clip(rho_i, 1 - epsilon, 1 + epsilon_high) A_i). cotlab makes one
//!   update per rollout (TRL's `num_iterations = 1`), so pi_old is the policy being differentiated,
//!   rho_i = 1 and the clip never binds: the gradient is -mean_i A_i grad sum_t log pi(y_t).
//! - `kl_in = "loss"` (cotlab's earlier RLOO): A_i from the raw rewards, and the loss is a token
//!   mean of -A_i log pi(y_t) + beta x k3(t), the k3 KL exp(ref - logp) - (ref - logp) - 1 of
//!   GRPO, inside the loss.
//!
//! Legend: `N` completions (prompts x k), `T` padded completion length.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use policy_models::CausalLm;
use policy_models::generate::Sampler;
use policy_models::optim::{AdamW, NonFinite, Updater};
use rl_algos::algorithm::{CheckpointState, parse_config};
use rl_algos::{
    AlgorithmEntry, AlgorithmInputs, Environment, Metrics, OptimSettings, PromptItem, RlAlgorithm, RlError,
    RolloutShape, rollout,
};
use serde::{Deserialize, Serialize};

/// Where the KL to the starting policy enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlIn {
    /// TRL's RLOO: beta x the per-sequence k1 KL off the reward, before the baseline; a
    /// sequence-level clipped loss.
    Reward,
    /// cotlab's earlier RLOO: beta x the per-token k3 KL in a token-mean loss.
    Loss,
}

/// RLOO settings; the defaults are TRL 1.16's `RLOOConfig`'s where TRL has the setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlooConfig {
    /// Completions per prompt (k). Default 4; at least 2, since each baseline uses the others.
    pub num_generations: usize,
    /// Most tokens per completion. Default 128.
    pub max_completion_length: usize,
    /// Sampling temperature. Default 1.0.
    pub temperature: f32,
    /// Weight of the KL to the starting policy. Default 0.05 (TRL); 0 loads no reference.
    pub beta: f64,
    /// Where the KL enters: `"reward"` (TRL, default) or `"loss"` (see the module doc).
    pub kl_in: KlIn,
    /// Lower clip range of the sequence ratio (`kl_in = "reward"`). Default 0.2.
    pub epsilon: f64,
    /// Upper clip range; default: `epsilon`.
    pub epsilon_high: Option<f64>,
    /// Normalise the advantages over the batch to mean 0, std 1. Default false (TRL).
    pub normalize_advantages: bool,
    /// Split the update's completions into this many micro-batches, accumulating gradients
    /// (the loss is a mean over the whole batch, so the update is the same). Default: as
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
            beta: 0.05,
            kl_in: KlIn::Reward,
            epsilon: 0.2,
            epsilon_high: None,
            normalize_advantages: false,
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
            return Err(format!(
                "rloo.num_generations = {}: the leave-one-out baseline needs at least 2",
                self.num_generations
            ));
        }
        if self.max_completion_length == 0 || !(self.temperature > 0.0) || !(self.beta >= 0.0) {
            return Err("rloo.max_completion_length must be at least 1, temperature positive and beta >= 0".to_string());
        }
        if !(self.epsilon > 0.0 && self.epsilon < 1.0) || self.epsilon_high.is_some_and(|high| !(high > 0.0)) {
            return Err(format!(
                "rloo.epsilon = {} must be in (0, 1) and epsilon_high = {:?} positive (or unset, to use epsilon)",
                self.epsilon, self.epsilon_high
            ));
        }
        if self.gradient_accumulation_steps == Some(0) || self.max_tokens_per_micro_batch == 0 {
            return Err(
                "rloo.gradient_accumulation_steps and max_tokens_per_micro_batch must be at least 1".to_string()
            );
        }
        Ok(())
    }

    /// The upper clip range: `epsilon_high`, else `epsilon`.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
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

/// TRL's RLOO advantages: the leave-one-out advantages of r_i - beta x `sequence_kl[i]` (when
/// given), then, with `normalize`, (A - mean(A)) / (std(A) + 1e-4) over the whole batch (std with
/// Bessel's correction, as TRL's `nanstd`).
pub fn rloo_advantages(rewards: &[f32], sequence_kl: Option<&[f32]>, beta: f64, k: usize, normalize: bool) -> Vec<f32> {
    let penalised: Vec<f32> = match sequence_kl {
        Some(kl) => rewards.iter().zip(kl).map(|(r, kl)| r - beta as f32 * kl).collect(),
        None => rewards.to_vec(),
    };
    let advantages = leave_one_out_advantages(&penalised, k);
    if !normalize || advantages.len() < 2 {
        return advantages;
    }
    let n = advantages.len() as f64;
    let mean = advantages.iter().map(|&a| f64::from(a)).sum::<f64>() / n;
    let variance = advantages.iter().map(|&a| (f64::from(a) - mean).powi(2)).sum::<f64>() / (n - 1.0);
    advantages.iter().map(|&a| ((f64::from(a) - mean) / (variance.sqrt() + 1e-4)) as f32).collect()
}

/// Shares of sequences whose ratio the clip bound (TRL's `clip_ratio/*`), as parts of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClipShares {
    /// rho < 1 - epsilon with A < 0.
    pub low: f64,
    /// rho > 1 + epsilon_high with A > 0.
    pub high: f64,
}

/// TRL's sequence-level RLOO loss of some rows, as their share of a batch of `total_sequences`:
/// sum_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i) / total_sequences with
/// rho_i = exp(sum_t mask x logp - old_logps_i).
///
/// # Shapes
/// - `per_token_logps`, `mask`: [N, T]; `old_logps` (summed over each row's tokens), `advantages`: [N]
/// - returns a loss of shape [1]
pub fn rloo_sequence_loss(
    per_token_logps: Tensor<2>,
    old_logps: Tensor<1>,
    advantages: Tensor<1>,
    mask: Tensor<2>,
    (eps_low, eps_high): (f64, f64),
    total_sequences: f64,
) -> (Tensor<1>, ClipShares) {
    let [rows, _] = per_token_logps.dims();
    let logps = (per_token_logps * mask).sum_dim(1).reshape([rows]);
    let ratio = (logps - old_logps).exp();
    let clipped = ratio.clone().clamp(1.0 - eps_low as f32, 1.0 + eps_high as f32);
    let per_sequence = -(ratio.clone() * advantages.clone()).min_pair(clipped * advantages.clone());
    let loss = per_sequence.sum().div_scalar(total_sequences as f32).reshape([1]);
    let share =
        |flags: Tensor<1, burn::tensor::Bool>| f64::from(flags.float().sum().into_scalar::<f32>()) / total_sequences;
    let ratio = ratio.detach();
    let low = share(ratio.clone().lower_elem(1.0 - eps_low as f32).bool_and(advantages.clone().lower_elem(0.0)));
    let high = share(ratio.greater_elem(1.0 + eps_high as f32).bool_and(advantages.greater_elem(0.0)));
    (loss, ClipShares { low, high })
}

/// The registry entry: the one line the study runner adds is `algo_rloo::ENTRY`.
pub const ENTRY: AlgorithmEntry = AlgorithmEntry {
    name: "rloo",
    validate,
    resolve: |value| rl_algos::algorithm::resolved_config("rloo", value, RlooConfig::validate),
    optimizer_steps_per_step,
    rollout_shape,
    build,
    resume,
};

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
    Ok(RolloutShape {
        completions_per_prompt: config.num_generations,
        max_completion_length: config.max_completion_length,
        max_sampling_rounds: 1,
        training_passes: 1,
    })
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
    let optimizer = AdamW::load(rloo.optim.adamw, &policy, &dir.join("optimizer.safetensors"))?;
    rloo.updater = Updater::new(policy, optimizer).with_dtype(rloo.optim.dtype);
    rloo.steps = state.steps;
    Ok(Box::new(rloo))
}

/// RLOO training state.
pub struct Rloo {
    config: RlooConfig,
    optim: OptimSettings,
    /// The policy and its optimizer.
    updater: Updater<CausalLm>,
    reference: Option<CausalLm>,
    steps: u64,
    seed: u64,
}

impl Rloo {
    /// Starts RLOO on `policy` (on an autodiff device).
    pub fn new(policy: CausalLm, config: RlooConfig, optim: OptimSettings, seed: u64) -> Result<Self, RlError> {
        config.validate().map_err(RlError::Config)?;
        optim.validate().map_err(RlError::Config)?;
        let reference = (config.beta > 0.0).then(|| rl_algos::algorithm::reference_policy(&policy));
        let updater = Updater::new(policy, AdamW::new(optim.adamw)).with_dtype(optim.dtype);
        Ok(Self { updater, config, optim, reference, steps: 0, seed })
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
        self.updater.model()
    }

    fn into_policy(self: Box<Self>) -> CausalLm {
        self.updater.into_model()
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<(), RlError> {
        self.policy().save_dir(&dir.join("policy"), None)?;
        self.updater.optimizer().save(self.policy(), &dir.join("optimizer.safetensors"))?;
        CheckpointState { steps: self.steps, seed: self.seed }.write(dir)
    }

    fn train_step(&mut self, prompts: &[PromptItem], environment: &Environment<'_>) -> Result<Metrics, RlError> {
        let started = Instant::now();
        let k = self.config.num_generations;
        // Rollouts and the KL penalty run on a copy without autodiff.
        let inference = self.updater.inference();
        let device = self.updater.model().devices().into_iter().next().expect("the policy has parameters");
        // 1. Rollout on a copy without autodiff.
        let sampler = Sampler::Sample { temperature: self.config.temperature, top_k: None, top_p: None };
        let seed = rollout::step_seed(self.seed, self.steps, 0);
        let rollout =
            rollout::sample(&inference, prompts, k, self.config.max_completion_length, sampler, environment, seed);
        // 2. Rewards, the KL penalty (kl_in = "reward") and leave-one-out advantages.
        let scored = rollout::reward(&rollout, prompts, environment);
        let completion_len = rollout.completion_len();
        let mask = rollout::loss_mask(&rollout, false, &device);
        let count = rollout.len();
        let (pad, share) = (environment.pad_token_id, self.config.share_prompt_prefix);
        let micro = rollout::scoring_micro_batch_rows(
            self.updater.model(),
            &rollout,
            prompts,
            share,
            self.config.gradient_accumulation_steps,
            self.config.max_tokens_per_micro_batch,
        );
        let tokens = f64::from(mask.clone().sum().into_scalar::<f32>()).max(1.0);
        let temperature = self.config.temperature;
        let kl_in = self.config.kl_in;
        // The reference computes in the policy's dtype, so that a bf16 run's KL is not rounding.
        let reference = self.reference.as_ref().map(|reference| self.updater.in_working_dtype(reference.clone()));
        let penalty = match (&reference, kl_in) {
            (Some(reference), KlIn::Reward) => {
                Some(sequence_kl(&inference, reference, &rollout, prompts, (pad, share), &mask, micro, temperature))
            }
            _ => None,
        };
        let advantages =
            rloo_advantages(&scored.total, penalty.as_deref(), self.config.beta, k, self.config.normalize_advantages);
        let mut metrics = Metrics::new();
        rollout::rollout_metrics(&rollout, &scored, &mut metrics);
        metrics.insert("reward_std".to_string(), eval::stats::mean_std(&scored.total).std);
        // 3. The loss over the batch, with gradients accumulated over micro-batches of rows
        // (bounded by the token budget), each one shard of rows per thread on the CPU; each
        // shard's loss is its share of the whole batch's mean.
        let advantages = Tensor::<1>::from_data(TensorData::new(advantages, [count]), &device);
        let beta = self.config.beta as f32;
        let epsilons = (self.config.epsilon, self.config.epsilon_high());
        let reference = reference.as_ref().filter(|_| kl_in == KlIn::Loss);
        let not_finite = |bad: NonFinite| RlError::NotFinite {
            step: self.steps + 1,
            quantity: bad.quantity().to_string(),
            value: bad.value(),
        };
        let mut accumulator = burn::optim::GradientsAccumulator::new();
        let (mut loss, mut shards) = (0.0, Vec::new());
        for start in (0..count).step_by(micro) {
            let shard = |policy: &CausalLm, shard_rows: std::ops::Range<usize>| {
                let rows = start + shard_rows.start..start + shard_rows.end;
                let sub = rollout.select(&rows.clone().collect::<Vec<usize>>());
                let sub_mask = mask.clone().slice([rows.clone(), 0..completion_len]);
                let sub_advantages = advantages.clone().slice([rows.clone()]);
                let (logps, entropies) = rollout::completion_scores(policy, &sub, prompts, pad, share, temperature);
                let entropy_sum = f64::from((entropies.detach() * sub_mask.clone()).sum().into_scalar::<f32>());
                let (loss, kl_sum, clip) = match kl_in {
                    KlIn::Reward => {
                        // One update per rollout: pi_old is the policy differentiated here.
                        let old_logps = (logps.clone().detach() * sub_mask.clone()).sum_dim(1).reshape([rows.len()]);
                        let (loss, clip) =
                            rloo_sequence_loss(logps, old_logps, sub_advantages, sub_mask, epsilons, count as f64);
                        (loss, 0.0, clip)
                    }
                    KlIn::Loss => {
                        let mut per_token = -(logps.clone() * sub_advantages.reshape([rows.len(), 1]));
                        let mut kl_sum = 0.0;
                        if let Some(reference) = reference {
                            let reference_logps = Tensor::from_inner(
                                rollout::completion_scores(reference, &sub, prompts, pad, share, temperature).0,
                            );
                            let difference = reference_logps - logps;
                            let kl = difference.clone().exp() - difference - 1.0;
                            kl_sum = f64::from((kl.clone().detach() * sub_mask.clone()).sum().into_scalar::<f32>());
                            per_token = per_token + kl * beta;
                        }
                        (((per_token * sub_mask).sum() / tokens as f32).reshape([1]), kl_sum, ClipShares::default())
                    }
                };
                (loss, (kl_sum, entropy_sum, clip))
            };
            let (micro_loss, grads, micro_shards) =
                self.updater.backward((start + micro).min(count) - start, shard).map_err(not_finite)?;
            loss += micro_loss;
            shards.extend(micro_shards);
            accumulator.accumulate(self.updater.model(), grads);
        }
        let grads = accumulator.grads();
        // The mean per-token KL: k1 at sampling time (kl_in = "reward", TRL's `kl`), or k3.
        let kl_mean = match &penalty {
            Some(kl) => kl.iter().map(|&kl| f64::from(kl)).sum::<f64>() / tokens,
            None => shards.iter().map(|(kl, _, _)| kl).sum::<f64>() / tokens,
        };
        let entropy = shards.iter().map(|(_, entropy, _)| entropy).sum::<f64>() / tokens;
        let clip_low = shards.iter().map(|(_, _, clip)| clip.low).sum::<f64>();
        let clip_high = shards.iter().map(|(_, _, clip)| clip.high).sum::<f64>();
        // 4. The update.
        let learning_rate = self.optim.schedule().learning_rate_at(self.updater.optimizer().steps());
        let stats = self.updater.update(grads, loss, self.optim.max_grad_norm, learning_rate).map_err(not_finite)?;
        self.steps += 1;
        for (name, value) in [
            ("loss", stats.loss),
            ("grad_norm", stats.grad_norm),
            ("update_norm", stats.update_norm),
            ("learning_rate", learning_rate),
            ("kl", kl_mean),
            ("entropy", entropy),
            ("clip_ratio/low_mean", clip_low),
            ("clip_ratio/high_mean", clip_high),
            ("clip_ratio/region_mean", clip_low + clip_high),
        ] {
            metrics.insert(name.to_string(), value);
        }
        let seconds = started.elapsed().as_secs_f64();
        metrics.insert("step_time".to_string(), seconds);
        metrics.insert(
            "tokens_per_second".to_string(),
            rollout.lengths().iter().sum::<usize>() as f64 / seconds.max(1e-9),
        );
        Ok(metrics)
    }
}

/// Each completion's k1 KL to `reference`, summed over its tokens: sum_t mask x (log pi(y_t) -
/// log ref(y_t)) under the rollout's policy (no gradients), with the log-probs of logits / T as
/// TRL's, computed `micro` rows at a time.
#[allow(clippy::too_many_arguments, reason = "the rollout and how to score it")]
fn sequence_kl(
    policy: &CausalLm,
    reference: &CausalLm,
    rollout: &rollout::Rollout,
    prompts: &[PromptItem],
    (pad_token_id, share): (i64, bool),
    mask: &Tensor<2>,
    micro: usize,
    temperature: f32,
) -> Vec<f32> {
    let completion_len = rollout.completion_len();
    let mut kl = Vec::with_capacity(rollout.len());
    for start in (0..rollout.len()).step_by(micro.max(1)) {
        let rows = start..(start + micro).min(rollout.len());
        let sub = rollout.select(&rows.clone().collect::<Vec<usize>>());
        let logps = rollout::completion_scores(policy, &sub, prompts, pad_token_id, share, temperature).0;
        let reference_logps = rollout::completion_scores(reference, &sub, prompts, pad_token_id, share, temperature).0;
        kl.extend(sequence_kl_sums(logps, reference_logps, mask.clone().slice([rows, 0..completion_len]).inner()));
    }
    kl
}

/// The k1 KL of each row summed over its tokens: sum_t mask x (logp - ref_logp).
///
/// # Shapes
/// - `logps`, `reference_logps`, `mask`: [N, T]; returns N values
pub fn sequence_kl_sums(logps: Tensor<2>, reference_logps: Tensor<2>, mask: Tensor<2>) -> Vec<f32> {
    ((logps - reference_logps) * mask).sum_dim(1).into_data().convert::<f32>().try_into_vec::<f32>().expect("f32")
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
