//! GRPO: group relative policy optimisation (Shao et al., 2024, DeepSeekMath, arXiv
//! 2402.03300), with the variants TRL users expect: clip-higher (`epsilon_high`, DAPO), the
//! loss aggregations `grpo`, `bnpo`, `dr_grpo` and `dapo`, `scale_rewards`, several passes per
//! rollout (`num_iterations`), truncated-completion masking and zero-variance group handling.
//!
//! The objective, per completion token t of completion i with advantage A_i:
//!   ratio = exp(logp - old_logp)
//!   loss_t = -min(ratio A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) A_i) + beta KL_t
//!   KL_t = exp(ref - logp) - (ref - logp) - 1          (the k3 estimator, always >= 0)
//! The KL term is *added* to the loss (penalising divergence from the reference policy).
//!
//! Legend: `N` completions in the batch (prompts x G), `T` padded completion length.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::advantages::ScaleRewards;

/// How per-token losses are aggregated into one number (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then over sequences (DeepSeekMath). Long completions
    /// weigh less per token.
    Grpo,
    /// Token mean over the local batch.
    Bnpo,
    /// Sum over tokens / (N x max_completion_length) (Dr. GRPO): no length normalisation bias.
    DrGrpo,
    /// Token mean over the whole generation batch (DAPO); equal to `bnpo` without gradient
    /// accumulation.
    Dapo,
}

/// What to do with groups whose rewards are all equal (their advantages are all zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroStdGroups {
    /// Keep them: they contribute only through the KL term (TRL's behaviour).
    Keep,
    /// Drop them from the loss.
    Skip,
    /// Draw new completions for them, up to `max_resample_tries` times (DAPO's dynamic sampling).
    Resample,
}

/// GRPO settings, with TRL's names. Every field has a default; `validate` checks them together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Completions per prompt (G). Default 8; at least 2, since advantages compare within a group.
    pub num_generations: usize,
    /// Most tokens per completion. Default 128.
    pub max_completion_length: usize,
    /// Sampling temperature of rollouts (and of log-prob computation, as TRL). Default 1.0.
    pub temperature: f32,
    /// Nucleus sampling of rollouts. Default 1.0 (off).
    pub top_p: f32,
    /// KL weight. Default 0.0 (TRL's current default: no reference model is loaded); DeepSeekMath
    /// used 0.04.
    pub beta: f64,
    /// Lower clip range. Default 0.2.
    pub epsilon: f64,
    /// Upper clip range; defaults to `epsilon`. DAPO's clip-higher uses 0.28.
    pub epsilon_high: Option<f64>,
    /// Loss aggregation. Default `dapo` (TRL's current default).
    pub loss_type: LossType,
    /// Reward scaling. Default `group`.
    pub scale_rewards: ScaleRewards,
    /// Policy updates per rollout (mu); old log-probs stay fixed across them. Default 1.
    pub num_iterations: usize,
    /// Exclude completions cut at `max_completion_length` from the loss (DAPO). Default false.
    pub mask_truncated_completions: bool,
    /// Zero-variance groups. Default `keep`.
    pub zero_std_groups: ZeroStdGroups,
    /// Bound on resampling rounds for `resample`. Default 3.
    pub max_resample_tries: usize,
    /// Split each update's completions into this many micro-batches, accumulating gradients
    /// before one optimizer step (bounds memory; the loss is normalised over the whole batch,
    /// so the update is the same). Default: as many as `max_tokens_per_micro_batch` asks.
    pub gradient_accumulation_steps: Option<usize>,
    /// When `gradient_accumulation_steps` is not set: the most tokens (rows x padded prompt +
    /// completion length; with `share_prompt_prefix`, each prompt once per forward pass that
    /// runs it + rows x completion length) per micro-batch, which bounds the activations a
    /// backward pass holds.
    /// Default 1024: SmolLM2-135M's 64 rows of ~235 tokens in 16 micro-batches, within TRL's
    /// memory for the same step (see [`crate::rollout::DEFAULT_MAX_TOKENS_PER_MICRO_BATCH`]).
    pub max_tokens_per_micro_batch: usize,
    /// Run each prompt once in the training and log-prob forwards, its G completions attending
    /// over its keys and values (see [`policy_models::prefix`]; the same numbers in fewer
    /// positions, and the token budget counts each prompt once per forward). Default true;
    /// false runs every row as prompt + completion. GPT-Neo always takes the full path.
    pub share_prompt_prefix: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            num_generations: 8,
            max_completion_length: 128,
            temperature: 1.0,
            top_p: 1.0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            mask_truncated_completions: false,
            zero_std_groups: ZeroStdGroups::Keep,
            max_resample_tries: 3,
            gradient_accumulation_steps: None,
            max_tokens_per_micro_batch: crate::rollout::DEFAULT_MAX_TOKENS_PER_MICRO_BATCH,
            share_prompt_prefix: true,
        }
    }
}

impl GrpoConfig {
    /// The upper clip range in use.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// Checks the settings; each message names the value and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_generations < 2 {
            return Err(format!(
                "grpo.num_generations = {}: GRPO compares completions within a group; use at least 2",
                self.num_generations
            ));
        }
        if self.max_completion_length == 0 || self.num_iterations == 0 || self.gradient_accumulation_steps == Some(0) || self.max_tokens_per_micro_batch == 0 {
            return Err("grpo.max_completion_length, num_iterations, gradient_accumulation_steps and max_tokens_per_micro_batch must be at least 1".to_string());
        }
        if !(self.epsilon > 0.0 && self.epsilon < 1.0) {
            return Err(format!("grpo.epsilon = {}: use a value in (0, 1), typically 0.2", self.epsilon));
        }
        if self.epsilon_high() < self.epsilon {
            return Err(format!(
                "grpo.epsilon_high = {} is below epsilon = {}; clip-higher needs epsilon_high >= epsilon",
                self.epsilon_high(),
                self.epsilon
            ));
        }
        if self.beta < 0.0 || !self.beta.is_finite() {
            return Err(format!("grpo.beta = {}: the KL weight must be 0 or positive", self.beta));
        }
        if !(self.temperature > 0.0) || !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "grpo.temperature = {} and top_p = {}: temperature must be positive and top_p in (0, 1]",
                self.temperature, self.top_p
            ));
        }
        if self.loss_type == LossType::DrGrpo && self.scale_rewards != ScaleRewards::None {
            return Err(format!(
                "grpo.loss_type = dr_grpo with scale_rewards = {:?}: Dr. GRPO removes the std scaling; set scale_rewards = \"none\"",
                self.scale_rewards
            ));
        }
        Ok(())
    }
}

/// Metrics of the objective, with TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveMetrics {
    /// Mean k3 KL to the reference over completion tokens (0 without a reference).
    pub kl: f64,
    /// Share of tokens whose ratio fell below 1 - epsilon with a negative advantage.
    pub clip_ratio_low_mean: f64,
    /// Share of tokens whose ratio rose above 1 + epsilon_high with a positive advantage.
    pub clip_ratio_high_mean: f64,
    /// Share of tokens clipped on either side.
    pub clip_ratio_region_mean: f64,
}

/// Batch-wide counts a micro-batch's loss is normalised by, so that the sum of micro-batch
/// losses equals the loss of the whole batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchTotals {
    /// Completions in the whole batch.
    pub sequences: usize,
    /// Loss-mask tokens in the whole batch.
    pub tokens: f32,
}

/// The GRPO loss and its metrics. With `totals`, the loss is this micro-batch's share of the
/// whole batch's loss (see [`BatchTotals`]); without, the batch is all there is.
///
/// # Shapes
/// - `per_token_logps`, `old_per_token_logps`, `ref_per_token_logps`, `mask`: [N, T]
///   (`mask` is 1 at completion tokens that count, 0 elsewhere)
/// - `advantages`: [N]
/// - returns a loss of shape [1]
pub fn grpo_objective(
    per_token_logps: Tensor<2>,
    old_per_token_logps: Tensor<2>,
    ref_per_token_logps: Option<Tensor<2>>,
    advantages: Tensor<1>,
    mask: Tensor<2>,
    config: &GrpoConfig,
    totals: Option<BatchTotals>,
) -> (Tensor<1>, ObjectiveMetrics) {
    let [count, length] = per_token_logps.dims();
    let advantages = advantages.reshape([count, 1]);
    let ratio = (per_token_logps.clone() - old_per_token_logps).exp();
    let (low, high) = (1.0 - config.epsilon, 1.0 + config.epsilon_high());
    let clipped = ratio.clone().clamp(low as f32, high as f32);
    let unclipped_objective = ratio.clone() * advantages.clone();
    let clipped_objective = clipped * advantages.clone();
    let mut per_token_loss = -unclipped_objective.min_pair(clipped_objective);
    let kl = ref_per_token_logps.map(|reference| {
        let difference = reference - per_token_logps.clone();
        difference.clone().exp() - difference - 1.0
    });
    if let (Some(kl), true) = (&kl, config.beta != 0.0) {
        per_token_loss = per_token_loss + kl.clone() * config.beta as f32;
    }
    let masked = per_token_loss * mask.clone();
    let (sequences, tokens) = match totals {
        Some(totals) => (totals.sequences as f32, Tensor::<1>::from_floats([totals.tokens.max(1.0)], &masked.device())),
        None => (count as f32, mask.clone().sum().clamp_min(1.0)),
    };
    let loss = match config.loss_type {
        LossType::Grpo => {
            let per_sequence = masked.sum_dim(1).reshape([count]) / mask.clone().sum_dim(1).reshape([count]).clamp_min(1.0);
            per_sequence.sum() / sequences
        }
        LossType::Bnpo | LossType::Dapo => masked.sum() / tokens,
        LossType::DrGrpo => masked.sum() / (sequences * config.max_completion_length as f32),
    };
    // Metrics, without gradients.
    let host = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
    let mask_host = host(mask);
    let ratio_host = host(ratio.detach());
    let advantages_host = advantages.detach().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
    let tokens: f64 = mask_host.iter().map(|&m| f64::from(m)).sum::<f64>().max(1.0);
    let (mut low_count, mut high_count) = (0.0f64, 0.0f64);
    for i in 0..count {
        for t in 0..length {
            let m = f64::from(mask_host[i * length + t]);
            let r = f64::from(ratio_host[i * length + t]);
            let a = advantages_host[i];
            if r < low && a < 0.0 {
                low_count += m;
            }
            if r > high && a > 0.0 {
                high_count += m;
            }
        }
    }
    let kl_mean = kl.map_or(0.0, |kl| {
        let kl = host(kl.detach());
        kl.iter().zip(&mask_host).map(|(k, m)| f64::from(k * m)).sum::<f64>() / tokens
    });
    let metrics = ObjectiveMetrics {
        kl: kl_mean,
        clip_ratio_low_mean: low_count / tokens,
        clip_ratio_high_mean: high_count / tokens,
        clip_ratio_region_mean: (low_count + high_count) / tokens,
    };
    (loss.reshape([1]), metrics)
}

// ---------------------------------------------------------------------------------------------
// The algorithm: rollout, rewards, advantages, then `num_iterations` updates.
// ---------------------------------------------------------------------------------------------

use std::time::Instant;

use burn::module::Module;
use burn::tensor::TensorData;
use policy_models::CausalLm;
use policy_models::generate::Sampler;
use burn::optim::GradientsAccumulator;
use policy_models::optim::{AdamW, apply_gradients, shard_ranges, sharded_backward};

use crate::advantages::group_advantages;
use crate::algorithm::{
    AlgorithmEntry, AlgorithmInputs, Environment, Metrics, OptimSettings, PromptItem, RlAlgorithm, RlError, RolloutShape, parse_config,
};
use crate::rollout::{self, Rollout};

/// GRPO training state: the policy, the frozen reference (when `beta > 0`), the optimizer.
pub struct Grpo {
    config: GrpoConfig,
    optim: OptimSettings,
    policy: Option<CausalLm>,
    reference: Option<CausalLm>,
    optimizer: AdamW,
    steps: u64,
    seed: u64,
}

/// The registry entry.
pub const ENTRY: AlgorithmEntry = AlgorithmEntry {
    name: "grpo",
    validate: validate_entry,
    optimizer_steps_per_step: optimizer_steps_entry,
    rollout_shape: rollout_shape_entry,
    build: build_entry,
    resume: resume_entry,
};

/// One optimizer step per iteration: micro-batches accumulate gradients into it.
fn optimizer_steps_entry(value: &serde_json::Value, _prompts_per_step: usize) -> Result<u64, String> {
    let config = parse_config::<GrpoConfig>("grpo", value)?;
    config.validate()?;
    Ok(config.num_iterations as u64)
}

fn rollout_shape_entry(value: &serde_json::Value) -> Result<RolloutShape, String> {
    let config = parse_config::<GrpoConfig>("grpo", value)?;
    config.validate()?;
    let resampling = if config.zero_std_groups == ZeroStdGroups::Resample { config.max_resample_tries } else { 0 };
    Ok(RolloutShape {
        completions_per_prompt: config.num_generations,
        max_completion_length: config.max_completion_length,
        max_sampling_rounds: 1 + resampling,
        training_passes: config.num_iterations,
    })
}

fn resume_entry(inputs: AlgorithmInputs, dir: &std::path::Path) -> Result<Box<dyn RlAlgorithm>, RlError> {
    let config = parse_config::<GrpoConfig>("grpo", &inputs.config).map_err(RlError::Config)?;
    Ok(Box::new(Grpo::resume(inputs.policy, config, inputs.optim, dir)?))
}

fn validate_entry(value: &serde_json::Value) -> Result<(), String> {
    parse_config::<GrpoConfig>("grpo", value)?.validate()
}

fn build_entry(inputs: AlgorithmInputs) -> Result<Box<dyn RlAlgorithm>, RlError> {
    let config = parse_config::<GrpoConfig>("grpo", &inputs.config).map_err(RlError::Config)?;
    Ok(Box::new(Grpo::new(inputs.policy, config, inputs.optim, inputs.seed)?))
}

/// Seeds differ per step and per resampling round, deterministically.
pub(crate) fn step_seed(seed: u64, step: u64, round: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
}

impl Grpo {
    /// Starts GRPO on `policy` (on an autodiff device). With `beta > 0` a frozen copy of the
    /// policy becomes the reference; with `beta = 0` none is kept.
    pub fn new(policy: CausalLm, config: GrpoConfig, optim: OptimSettings, seed: u64) -> Result<Self, RlError> {
        config.validate().map_err(RlError::Config)?;
        optim.validate().map_err(RlError::Config)?;
        let reference = (config.beta > 0.0).then(|| crate::algorithm::reference_policy(&policy));
        let optimizer = AdamW::new(optim.adamw);
        Ok(Self { config, optim, policy: Some(policy), reference, optimizer, steps: 0, seed })
    }

    /// Resumes from a checkpoint directory; `start` is the run's starting policy (the reference).
    pub fn resume(start: CausalLm, config: GrpoConfig, optim: OptimSettings, dir: &std::path::Path) -> Result<Self, RlError> {
        let state = crate::algorithm::CheckpointState::read(dir)?;
        let policy = crate::algorithm::checkpoint_policy(&start, dir)?;
        let mut grpo = Self::new(start, config, optim, state.seed)?;
        grpo.optimizer = AdamW::load(grpo.optim.adamw, &policy, &dir.join("optimizer.safetensors"))?;
        grpo.policy = Some(policy);
        grpo.steps = state.steps;
        Ok(grpo)
    }

    /// Replaces completions of groups whose rewards are all equal with new samples, up to
    /// `max_resample_tries` rounds (DAPO's dynamic sampling). Returns the rounds used.
    fn resample_flat_groups(
        &self,
        inference: &CausalLm,
        prompts: &[PromptItem],
        environment: &Environment<'_>,
        rollout: &mut Rollout,
        rewards: &mut crate::rewards::ScoredBatch,
    ) -> usize {
        let g = self.config.num_generations;
        for round in 1..=self.config.max_resample_tries {
            let (_, zero_std) = group_advantages(&rewards.total, g, self.config.scale_rewards);
            let flat: Vec<usize> = (0..prompts.len()).filter(|&p| zero_std[p * g]).collect();
            if flat.is_empty() {
                return round - 1;
            }
            let subset: Vec<PromptItem> = flat.iter().map(|&p| prompts[p].clone()).collect();
            let fresh = rollout::sample(inference, &subset, g, self.config.max_completion_length, self.sampler(), environment, step_seed(self.seed, self.steps, round as u64));
            let fresh_rewards = rollout::reward(&fresh, &subset, environment);
            for (k, &p) in flat.iter().enumerate() {
                for j in 0..g {
                    let (target, source) = (p * g + j, k * g + j);
                    rollout.replace(target, &fresh, source);
                    rewards.total[target] = fresh_rewards.total[source];
                    for (column, fresh_column) in rewards.per_function.iter_mut().zip(&fresh_rewards.per_function) {
                        column.1[target] = fresh_column.1[source];
                    }
                }
            }
        }
        self.config.max_resample_tries
    }

    fn sampler(&self) -> Sampler {
        Sampler::Sample {
            temperature: self.config.temperature,
            top_k: None,
            top_p: (self.config.top_p < 1.0).then_some(self.config.top_p),
        }
    }
}

impl RlAlgorithm for Grpo {
    fn name(&self) -> &'static str {
        "grpo"
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

    fn save_checkpoint(&self, dir: &std::path::Path) -> Result<(), RlError> {
        self.policy().save_dir(&dir.join("policy"), None)?;
        self.optimizer.save(self.policy(), &dir.join("optimizer.safetensors"))?;
        crate::algorithm::CheckpointState { steps: self.steps, seed: self.seed }.write(dir)
    }

    fn train_step(&mut self, prompts: &[PromptItem], environment: &Environment<'_>) -> Result<Metrics, RlError> {
        let started = Instant::now();
        let g = self.config.num_generations;
        let mut policy = self.policy.take().expect("the policy is present between steps");
        let device = policy.devices().into_iter().next().expect("the policy has parameters");
        // Rollouts run on a copy without autodiff: no graph is built, none can leak.
        let inference = policy.valid();
        let mut rollout = rollout::sample(&inference, prompts, g, self.config.max_completion_length, self.sampler(), environment, step_seed(self.seed, self.steps, 0));
        let mut scored = rollout::reward(&rollout, prompts, environment);
        let mut metrics = Metrics::new();
        if self.config.zero_std_groups == ZeroStdGroups::Resample {
            let rounds = self.resample_flat_groups(&inference, prompts, environment, &mut rollout, &mut scored);
            metrics.insert("resample_rounds".to_string(), rounds as f64);
        }
        let (advantages, zero_std) = group_advantages(&scored.total, g, self.config.scale_rewards);
        rollout::rollout_metrics(&rollout, &scored, &mut metrics);
        let group_stds: Vec<f32> = scored.total.chunks(g).map(|group| crate::algorithm::mean_std(group).1 as f32).collect();
        metrics.insert("reward_std".to_string(), crate::algorithm::mean_std(&group_stds).0);
        metrics.insert("frac_reward_zero_std".to_string(), zero_std.iter().filter(|z| **z).count() as f64 / zero_std.len() as f64);

        let update_started = Instant::now();
        let completion_len = rollout.completion_len();
        let (pad, share) = (environment.pad_token_id, self.config.share_prompt_prefix);
        let mut mask = rollout::loss_mask(&rollout, self.config.mask_truncated_completions, &device);
        if self.config.zero_std_groups == ZeroStdGroups::Skip {
            let keep: Vec<f32> = zero_std.iter().map(|&z| if z { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::<1>::from_data(TensorData::new(keep, [rollout.len()]), &device);
            mask = mask * keep.reshape([rollout.len(), 1]);
        }
        let advantages = Tensor::<1>::from_data(TensorData::new(advantages, [rollout.len()]), &device);
        let temperature = self.config.temperature;
        // Old log-probs are needed only when the policy moves between passes over the rollout.
        let old = (self.config.num_iterations > 1)
            .then(|| Tensor::from_inner(rollout::completion_scores(&inference, &rollout, prompts, pad, share, temperature).0));
        let reference = self
            .reference
            .as_ref()
            .map(|reference| Tensor::from_inner(rollout::completion_scores(reference, &rollout, prompts, pad, share, temperature).0));
        let schedule = self.optim.schedule();
        let count = rollout.len();
        let mask_host = mask.clone().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
        let totals = BatchTotals { sequences: count, tokens: mask_host.iter().sum::<f32>() };
        // A micro-batch's tokens: what its shards' forward passes run.
        let micro_tokens = |rows: std::ops::Range<usize>| {
            let shards = shard_ranges(&policy, rows.len());
            shards.into_iter().map(|shard| rollout::scoring_positions(&rollout, prompts, rows.start + shard.start..rows.start + shard.end, share)).sum()
        };
        let micro = rollout::micro_batch_rows_by(count, self.config.gradient_accumulation_steps, self.config.max_tokens_per_micro_batch, micro_tokens);
        let slice_rows = |t: &Tensor<2>, rows: std::ops::Range<usize>| t.clone().slice([rows, 0..completion_len]);
        // Token-weighted sums of the objective's metrics and of the entropy over the
        // micro-batches of every iteration, whose mean is reported (TRL logs them at each).
        // Clipping can only show after the first iteration: until the policy moves, ratios are 1.
        let mut weighted = [0.0f64; 5];
        for _iteration in 0..self.config.num_iterations {
            let mut accumulator = GradientsAccumulator::new();
            let mut loss_sum = 0.0;
            for start in (0..count).step_by(micro.max(1)) {
                // Each micro-batch runs as one shard of rows per thread on the CPU; a shard's
                // loss is its share of the batch loss (normalised by the batch totals).
                let shard = |policy: &CausalLm, shard_rows: std::ops::Range<usize>| {
                    let rows = start + shard_rows.start..start + shard_rows.end;
                    let sub = rollout.select(&rows.clone().collect::<Vec<_>>());
                    let (logps, entropies) = rollout::completion_scores(policy, &sub, prompts, pad, share, temperature);
                    let old_logps = old.as_ref().map_or_else(|| logps.clone().detach(), |old| slice_rows(old, rows.clone()));
                    let sub_mask = slice_rows(&mask, rows.clone());
                    let (loss, objective) = grpo_objective(
                        logps,
                        old_logps,
                        reference.as_ref().map(|reference| slice_rows(reference, rows.clone())),
                        advantages.clone().slice([rows.clone()]),
                        sub_mask.clone(),
                        &self.config,
                        Some(totals),
                    );
                    let sub_tokens = f64::from(sub_mask.clone().sum().into_scalar::<f32>());
                    let entropy_sum = f64::from((entropies.detach() * sub_mask).sum().into_scalar::<f32>());
                    let sums = [
                        objective.kl * sub_tokens,
                        objective.clip_ratio_low_mean * sub_tokens,
                        objective.clip_ratio_high_mean * sub_tokens,
                        objective.clip_ratio_region_mean * sub_tokens,
                        entropy_sum,
                    ];
                    (loss, sums)
                };
                let rows = (start + micro).min(count) - start;
                let (loss, grads, shard_sums) = match sharded_backward(&policy, rows, shard) {
                    Ok(computed) => computed,
                    Err(bad) => {
                        self.policy = Some(policy);
                        return Err(RlError::NotFinite { step: self.steps + 1, quantity: bad.quantity().to_string(), value: bad.value() });
                    }
                };
                loss_sum += loss;
                for sums in shard_sums {
                    for (total, value) in weighted.iter_mut().zip(sums) {
                        *total += value;
                    }
                }
                accumulator.accumulate(&policy, grads);
            }
            let learning_rate = schedule.learning_rate_at(self.optimizer.steps());
            let (updated, stats) =
                match apply_gradients(policy, accumulator.grads(), loss_sum, &mut self.optimizer, self.optim.max_grad_norm, learning_rate) {
                    Ok(updated) => updated,
                    Err((policy, bad)) => {
                        self.policy = Some(policy);
                        return Err(RlError::NotFinite { step: self.steps + 1, quantity: bad.quantity().to_string(), value: bad.value() });
                    }
                };
            policy = updated;
            metrics.insert("loss".to_string(), stats.loss);
            metrics.insert("grad_norm".to_string(), stats.grad_norm);
            metrics.insert("update_norm".to_string(), stats.update_norm);
            metrics.insert("learning_rate".to_string(), learning_rate);
        }
        let tokens = f64::from(totals.tokens).max(1.0) * self.config.num_iterations as f64;
        for (name, sum) in ["kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"].iter().zip(weighted) {
            metrics.insert(name.to_string(), sum / tokens);
        }
        self.policy = Some(policy);
        self.steps += 1;
        let seconds = started.elapsed().as_secs_f64();
        let generated: usize = rollout.lengths().iter().sum();
        metrics.insert("step_time".to_string(), seconds);
        // The update phase alone (scoring, backward passes, optimizer steps), without sampling.
        metrics.insert("update_time".to_string(), update_started.elapsed().as_secs_f64());
        metrics.insert("tokens_per_second".to_string(), generated as f64 / seconds.max(1e-9));
        Ok(metrics)
    }
}
