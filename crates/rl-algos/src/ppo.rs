//! PPO for language models (Schulman et al., 2017; Ouyang et al., 2022), as TRL's PPOTrainer
//! and cleanrl compute it, with a value head on the policy's last hidden state.
//!
//! Per step: sample one completion per prompt; score it (rule rewards, a reward model, or both:
//! anything behind the reward-function trait), less `missing_eos_penalty` when it did not end with
//! the end-of-sequence token; per-token rewards are -kl_coef x KL(policy || reference) (k1 or k3)
//! plus the score at the last completion token, optionally whitened (`whiten_rewards`: masked
//! whitening that keeps the mean, TRL's `shift_mean=False`); GAE(gamma, lambda) gives advantages
//! (whitened) and returns; then `num_ppo_epochs` passes, each over a fresh seeded permutation of
//! the rollout cut into `num_mini_batches` minibatches (TRL's `np.random.permutation` per epoch),
//! minimise the clipped policy loss + vf_coef x the clipped value loss - entropy_coef x entropy.
//! With `adaptive_kl`, kl_coef follows Ziegler et al. (2019)'s controller after each step:
//! kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) x N / horizon, KL being `objective/kl` (the
//! per-token KL summed over each completion, averaged over completions).
//!
//! By default (`value_model = "shared"`) the value head sits on the policy's own last hidden
//! state (a shared trunk), where TRL's PPOTrainer trains a separate value model (its
//! `PolicyAndValueWrapper`). So the value loss's gradient, scaled by vf_coef (0.1 by default),
//! also flows into the policy's weights: the trunk gets the policy gradient plus vf_coef x the
//! value-loss gradient. `value_model = "separate"` is TRL's layout: the head sits on a second copy
//! of the starting policy (its own parameters, trained in the same AdamW step, saved in
//! checkpoints under `value_model/`), so the policy gets only the policy gradient, at the cost of
//! a second trunk's memory, forward and backward passes. Either way the head starts at zero
//! rather than from a reward model's weights (TRL initialises its value model from the reward
//! model), and the global gradient clipping spans policy and value parameters together.
//!
//! Legend: `N` completions, `T` padded completion length, `C` model width.

use std::time::Instant;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Tensor, TensorData};
use policy_models::generate::{Sampler, StopReason, log_probs_from_hidden};
use policy_models::optim::{AdamW, NonFinite, Updater};
use policy_models::{CausalLm, StepInput};
use serde::{Deserialize, Serialize};

use crate::advantages::{gae, whiten};
use crate::algorithm::{
    AlgorithmEntry, AlgorithmInputs, Environment, Metrics, OptimSettings, PromptItem, RlAlgorithm, RlError,
    RolloutShape, parse_config,
};
use crate::rollout;
use crate::rollout::step_seed;

/// The KL estimator of the per-token penalty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// log pi - log ref: unbiased, can be negative per token (TRL's default).
    K1,
    /// exp(ref - logp) - (ref - logp) - 1: unbiased and never negative.
    K3,
}

/// Ziegler et al. (2019)'s adaptive KL controller (TRL's old PPOTrainer: `adap_kl_ctrl`, with
/// `init_kl_coef` = [`PpoConfig::kl_coef`], `target`, `horizon`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveKl {
    /// The per-completion KL (`objective/kl`) to steer towards. Default 6.0 (TRL's).
    pub target: f64,
    /// Completions over which the coefficient may move by up to 20%. Default 10000 (TRL's).
    pub horizon: f64,
}

impl Default for AdaptiveKl {
    fn default() -> Self {
        Self { target: 6.0, horizon: 10000.0 }
    }
}

/// The next KL coefficient after a step of `completions` completions whose mean summed KL was
/// `current_kl`: value x (1 + clip(current_kl / target - 1, -0.2, 0.2) x completions / horizon).
pub fn adaptive_kl_coef(value: f64, current_kl: f64, completions: usize, settings: &AdaptiveKl) -> f64 {
    let error = (current_kl / settings.target - 1.0).clamp(-0.2, 0.2);
    value * (1.0 + error * completions as f64 / settings.horizon)
}

/// Scores less `penalty` for the completions that did not end with the end-of-sequence token
/// (TRL's `missing_eos_penalty`: stopped by a stop string or truncated at the length limit).
pub fn penalise_missing_eos(scores: &[f32], stop_reasons: &[StopReason], penalty: Option<f64>) -> Vec<f32> {
    scores
        .iter()
        .zip(stop_reasons)
        .map(|(&score, reason)| match penalty {
            Some(penalty) if *reason != StopReason::Eos => score - penalty as f32,
            _ => score,
        })
        .collect()
}

/// The order in which epoch `epoch` of step `step` visits the rollout's `count` rows: a
/// permutation drawn from the run's seed, so a rerun visits the same minibatches.
pub fn epoch_order(count: usize, seed: u64, step: u64, epoch: usize) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..count).collect();
    // Rounds from 1: round 0 is the step's sampling seed.
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(step_seed(seed, step, 1 + epoch as u64)));
    order
}

/// Where PPO's value head sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueModel {
    /// On the policy's last hidden state: one trunk, whose weights the value loss also moves.
    Shared,
    /// On its own copy of the starting policy (TRL's layout).
    Separate,
}

/// PPO settings, with TRL's names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Most tokens per completion. Default 128.
    pub max_completion_length: usize,
    /// Sampling temperature. Default 1.0.
    pub temperature: f32,
    /// Nucleus sampling. Default 1.0 (off).
    pub top_p: f32,
    /// Weight of the per-token KL penalty in the reward. Default 0.05.
    pub kl_coef: f64,
    /// KL estimator. Default k1.
    pub kl_estimator: KlEstimator,
    /// Policy clip range. Default 0.2.
    pub cliprange: f64,
    /// Value clip range. Default 0.2.
    pub cliprange_value: f64,
    /// Value loss weight. Default 0.1.
    pub vf_coef: f64,
    /// Entropy bonus weight. Default 0.0.
    pub entropy_coef: f64,
    /// Discount. Default 1.0 (episodic, one reward at the end).
    pub gamma: f64,
    /// GAE lambda. Default 0.95.
    pub lam: f64,
    /// Passes over each rollout. Default 4.
    pub num_ppo_epochs: usize,
    /// Minibatches per pass. Default 1.
    pub num_mini_batches: usize,
    /// Whiten advantages. Default true.
    pub whiten_advantages: bool,
    /// Whiten the per-token rewards (keeping their mean) before GAE. Default false (TRL).
    pub whiten_rewards: bool,
    /// Subtracted from the score of a completion without the end-of-sequence token. Default
    /// none (TRL).
    pub missing_eos_penalty: Option<f64>,
    /// Adaptive KL control, with `kl_coef` the initial coefficient, e.g. `adaptive_kl = { target =
    /// 6.0, horizon = 10000 }`. Default none: `kl_coef` stays fixed (TRL's PPOTrainer).
    pub adaptive_kl: Option<AdaptiveKl>,
    /// Where the value head sits: `"shared"` (default; the policy's trunk) or `"separate"` (a
    /// copy of the starting policy, TRL's layout; not with LoRA).
    pub value_model: ValueModel,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            max_completion_length: 128,
            temperature: 1.0,
            top_p: 1.0,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            entropy_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            whiten_advantages: true,
            whiten_rewards: false,
            missing_eos_penalty: None,
            adaptive_kl: None,
            value_model: ValueModel::Shared,
        }
    }
}

impl PpoConfig {
    /// Checks the settings; each message names the value and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_completion_length == 0 || self.num_ppo_epochs == 0 || self.num_mini_batches == 0 {
            return Err("ppo.max_completion_length, num_ppo_epochs and num_mini_batches must be at least 1".to_string());
        }
        if !(self.cliprange > 0.0 && self.cliprange < 1.0) || !(self.cliprange_value > 0.0) {
            return Err(format!(
                "ppo.cliprange = {} must be in (0, 1) and cliprange_value = {} positive",
                self.cliprange, self.cliprange_value
            ));
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.lam) {
            return Err(format!("ppo.gamma = {} and lam = {} must be in [0, 1]", self.gamma, self.lam));
        }
        if self.kl_coef < 0.0 || self.vf_coef < 0.0 || self.entropy_coef < 0.0 {
            return Err("ppo.kl_coef, vf_coef and entropy_coef must be 0 or positive".to_string());
        }
        if !(self.temperature > 0.0) || !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "ppo.temperature = {} must be positive and top_p = {} in (0, 1]",
                self.temperature, self.top_p
            ));
        }
        if let Some(penalty) = self.missing_eos_penalty.filter(|p| !p.is_finite()) {
            return Err(format!("ppo.missing_eos_penalty = {penalty} must be a finite number (or left out for none)"));
        }
        if let Some(adaptive) = self.adaptive_kl.filter(|a| !(a.target > 0.0 && a.horizon > 0.0)) {
            return Err(format!(
                "ppo.adaptive_kl = {{ target = {}, horizon = {} }}: both must be positive (or leave adaptive_kl out for a fixed kl_coef)",
                adaptive.target, adaptive.horizon
            ));
        }
        Ok(())
    }
}

/// Rewards, advantages and returns of a rollout, per token ([N][T], zero at padding).
#[derive(Debug, Clone, PartialEq)]
pub struct PpoTargets {
    /// Per-token rewards: -kl_coef x KL, plus the score at the last token.
    pub rewards: Vec<Vec<f32>>,
    /// (Whitened) advantages.
    pub advantages: Vec<Vec<f32>>,
    /// Value targets: advantages (before whitening) + values.
    pub returns: Vec<Vec<f32>>,
    /// Mean per-token KL over completion tokens.
    pub kl: f64,
    /// The KL summed over each completion's tokens, averaged over completions (TRL's
    /// `objective/kl`).
    pub sequence_kl: f64,
    /// -kl_coef x the summed KL, averaged over completions (`objective/non_score_reward`).
    pub non_score_reward: f64,
}

/// Computes PPO's per-token rewards, GAE advantages and returns from the rollout's log-probs,
/// reference log-probs and values (each [N][T], only the first `lengths[i]` entries of row i
/// are real) and the sequence scores.
pub fn ppo_targets(
    logprobs: &[Vec<f32>],
    ref_logprobs: &[Vec<f32>],
    values: &[Vec<f32>],
    scores: &[f32],
    lengths: &[usize],
    config: &PpoConfig,
) -> PpoTargets {
    let width = logprobs.first().map_or(0, Vec::len);
    let (mut rewards, mut advantages, mut returns) = (Vec::new(), Vec::new(), Vec::new());
    let (mut kl_sum, mut non_score_sum, mut tokens) = (0.0f64, 0.0f64, 0usize);
    for row in 0..logprobs.len() {
        let length = lengths[row];
        let mut row_rewards = vec![0.0f32; width];
        for t in 0..length {
            let log_ratio = ref_logprobs[row][t] - logprobs[row][t];
            let kl = match config.kl_estimator {
                KlEstimator::K1 => -log_ratio,
                KlEstimator::K3 => log_ratio.exp() - 1.0 - log_ratio,
            };
            kl_sum += f64::from(kl);
            row_rewards[t] = -(config.kl_coef as f32) * kl;
            non_score_sum += f64::from(row_rewards[t]);
        }
        tokens += length;
        if length > 0 {
            row_rewards[length - 1] += scores[row];
        }
        rewards.push(row_rewards);
    }
    if config.whiten_rewards {
        // TRL's masked_whiten(shift_mean=False): centred and scaled, then the mean added back.
        let real: Vec<f32> = rewards.iter().zip(lengths).flat_map(|(row, &l)| row[..l].to_vec()).collect();
        let mean = real.iter().sum::<f32>() / real.len().max(1) as f32;
        let mut whitened = whiten(&real).into_iter();
        for (row, &length) in rewards.iter_mut().zip(lengths) {
            for value in row.iter_mut().take(length) {
                *value = whitened.next().expect("one whitened value per real token") + mean;
            }
        }
    }
    for (row, row_rewards) in rewards.iter().enumerate() {
        let length = lengths[row];
        let (row_advantages, row_returns) =
            gae(&row_rewards[..length], &values[row][..length], config.gamma as f32, config.lam as f32);
        let pad = |mut v: Vec<f32>| {
            v.resize(width, 0.0);
            v
        };
        advantages.push(pad(row_advantages));
        returns.push(pad(row_returns));
    }
    if config.whiten_advantages {
        let real: Vec<f32> = advantages.iter().zip(lengths).flat_map(|(row, &l)| row[..l].to_vec()).collect();
        let mut whitened = whiten(&real).into_iter();
        for (row, &length) in advantages.iter_mut().zip(lengths) {
            for value in row.iter_mut().take(length) {
                *value = whitened.next().expect("one whitened value per real token");
            }
        }
    }
    let completions = logprobs.len().max(1) as f64;
    PpoTargets {
        rewards,
        advantages,
        returns,
        kl: kl_sum / tokens.max(1) as f64,
        sequence_kl: kl_sum / completions,
        non_score_reward: non_score_sum / completions,
    }
}

/// Metrics of the PPO objective, with TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PpoLossMetrics {
    /// The clipped policy loss (`loss/policy`).
    pub policy_loss: f64,
    /// The clipped value loss (`loss/value`).
    pub value_loss: f64,
    /// 0.5 x mean squared log-ratio (`policy/approxkl`).
    pub approxkl: f64,
    /// Share of tokens where clipping bound the policy loss (`policy/clipfrac`).
    pub clipfrac: f64,
    /// Share of tokens where the clipped value loss was the larger (`val/clipfrac`).
    pub value_clipfrac: f64,
}

impl PpoLossMetrics {
    /// Field by field sum (shards' shares, minibatches' values).
    fn plus(self, other: Self) -> Self {
        Self {
            policy_loss: self.policy_loss + other.policy_loss,
            value_loss: self.value_loss + other.value_loss,
            approxkl: self.approxkl + other.approxkl,
            clipfrac: self.clipfrac + other.clipfrac,
            value_clipfrac: self.value_clipfrac + other.value_clipfrac,
        }
    }
}

/// Sums over one step's minibatch updates, averaged into its metrics.
#[derive(Default)]
struct UpdateSums {
    objective: PpoLossMetrics,
    entropy: f64,
    grad_norm: f64,
    update_norm: f64,
    updates: usize,
}

/// The PPO loss: clipped policy loss + vf_coef x clipped value loss.
///
/// # Shapes
/// - `new_logprobs`, `old_logprobs`, `advantages`, `vpred`, `old_values`, `returns`, `mask`: [N, T]
/// - returns a loss of shape [1]
#[allow(clippy::too_many_arguments, reason = "the objective's inputs, named as in the papers")]
pub fn ppo_objective(
    new_logprobs: Tensor<2>,
    old_logprobs: Tensor<2>,
    advantages: Tensor<2>,
    vpred: Tensor<2>,
    old_values: Tensor<2>,
    returns: Tensor<2>,
    mask: Tensor<2>,
    config: &PpoConfig,
) -> (Tensor<1>, PpoLossMetrics) {
    let tokens = f64::from(mask.clone().sum().into_scalar::<f32>()).max(1.0);
    ppo_objective_share(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, config, tokens)
}

/// [`ppo_objective`] of some rows of a minibatch whose masked means divide by `total_tokens`,
/// the whole minibatch's count: the loss and metrics are these rows' shares, and the shares of
/// a minibatch split into shards add up to [`ppo_objective`] of the whole.
#[allow(clippy::too_many_arguments)]
pub fn ppo_objective_share(
    new_logprobs: Tensor<2>,
    old_logprobs: Tensor<2>,
    advantages: Tensor<2>,
    vpred: Tensor<2>,
    old_values: Tensor<2>,
    returns: Tensor<2>,
    mask: Tensor<2>,
    config: &PpoConfig,
    total_tokens: f64,
) -> (Tensor<1>, PpoLossMetrics) {
    let masked_mean = |x: Tensor<2>| (x * mask.clone()).sum() / total_tokens as f32;
    let value_clip = config.cliprange_value as f32;
    let vpred_clipped = vpred.clone().max_pair(old_values.clone() - value_clip).min_pair(old_values + value_clip);
    let value_losses = (vpred - returns.clone()).powi_scalar(2);
    let value_losses_clipped = (vpred_clipped - returns).powi_scalar(2);
    let value_clipped = value_losses_clipped.clone().greater(value_losses.clone()).float().detach();
    let value_loss = masked_mean(value_losses.max_pair(value_losses_clipped)) * 0.5;
    let log_ratio = new_logprobs - old_logprobs;
    let ratio = log_ratio.clone().exp();
    let clip = config.cliprange as f32;
    let policy_losses = -advantages.clone() * ratio.clone();
    let policy_losses_clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip);
    let clipped = policy_losses_clipped.clone().greater(policy_losses.clone()).float();
    let policy_loss = masked_mean(policy_losses.max_pair(policy_losses_clipped));
    let loss = policy_loss.clone() + value_loss.clone() * config.vf_coef as f32;
    let scalar = |t: Tensor<1>| f64::from(t.detach().into_scalar::<f32>());
    let metrics = PpoLossMetrics {
        policy_loss: scalar(policy_loss),
        value_loss: scalar(value_loss),
        approxkl: scalar(masked_mean(log_ratio.detach().powi_scalar(2)) * 0.5),
        clipfrac: scalar(masked_mean(clipped.detach())),
        value_clipfrac: scalar(masked_mean(value_clipped)),
    };
    (loss.reshape([1]), metrics)
}

/// The policy with a scalar value head on its last hidden state, or on that of a separate value
/// trunk.
#[derive(Module, Debug)]
pub struct PolicyWithValueHead {
    /// The language model.
    pub policy: CausalLm,
    /// C -> 1.
    pub value_head: Linear,
    /// With `value_model = "separate"`: the trunk the value head reads.
    pub value_trunk: Option<CausalLm>,
}

/// Gives every parameter a new id and a new autodiff leaf over the same values, so a copy of a
/// model trains as parameters of its own (burn's `clone` keeps the ids, which key gradients and
/// AdamW's moments).
struct FreshParams;

impl burn::module::ModuleMapper for FreshParams {
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let (_, tensor, mapper) = param.consume();
        let trainable = tensor.is_require_grad();
        let mut tensor = tensor.detach();
        if trainable {
            tensor = tensor.require_grad();
        }
        burn::module::Param::from_mapped_value(burn::module::ParamId::new(), tensor, mapper)
    }
}

impl PolicyWithValueHead {
    /// Log-probs, entropies and values of the completion tokens of `input`.
    ///
    /// # Shapes
    /// - returns three [N, T] tensors
    pub fn score(
        &self,
        input: &StepInput,
        completion_len: usize,
        temperature: f32,
    ) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        let hidden = self.policy.hidden_states(input, &mut self.policy.new_cache()); // [N, P+T, C]
        let [batch, total, width] = hidden.dims();
        // The fused head: no [N, P+T, V] logits; entropies carry gradients (entropy_coef).
        let (logps, entropies) =
            log_probs_from_hidden(&self.policy, hidden.clone(), input, completion_len, temperature);
        let hidden = match &self.value_trunk {
            Some(trunk) => trunk.hidden_states(input, &mut trunk.new_cache()),
            None => hidden,
        };
        // The value of the state before each completion token: the same positions that predict it.
        let states = hidden.slice([0..batch, total - completion_len - 1..total - 1, 0..width]);
        // Hidden states come back in f32; the head computes in its own dtype (bf16 in a
        // mixed-precision pass), and values go on in f32 as log-probs do.
        let states = states.cast(self.value_head.weight.val().dtype());
        let values =
            self.value_head.forward(states).reshape([batch, completion_len]).cast(burn::tensor::FloatDType::F32);
        (logps, entropies, values)
    }
}

/// PPO training state.
pub struct Ppo {
    config: PpoConfig,
    optim: OptimSettings,
    /// The policy with its value head, and their optimizer.
    updater: Updater<PolicyWithValueHead>,
    reference: CausalLm,
    steps: u64,
    seed: u64,
    /// The KL coefficient of the next step: `config.kl_coef`, moved by `adaptive_kl` when set.
    kl_coef: f64,
}

/// The file in a checkpoint that keeps PPO's KL coefficient (it moves under `adaptive_kl`).
const KL_STATE_FILE: &str = "ppo_state.json";

/// The directory in a checkpoint that holds a separate value model's trunk.
const VALUE_MODEL_DIR: &str = "value_model";

/// The registry entry.
pub const ENTRY: AlgorithmEntry = AlgorithmEntry {
    name: "ppo",
    validate: validate_entry,
    resolve: |value| crate::algorithm::resolved_config("ppo", value, PpoConfig::validate),
    optimizer_steps_per_step: optimizer_steps_entry,
    rollout_shape: rollout_shape_entry,
    build: build_entry,
    resume: resume_entry,
};

/// One optimizer step per minibatch of each epoch; PPO samples one completion per prompt.
fn optimizer_steps_entry(value: &serde_json::Value, prompts_per_step: usize) -> Result<u64, String> {
    let config = parse_config::<PpoConfig>("ppo", value)?;
    config.validate()?;
    Ok((config.num_ppo_epochs * minibatches(prompts_per_step, config.num_mini_batches).len()) as u64)
}

/// One completion per prompt, trained on once per epoch.
fn rollout_shape_entry(value: &serde_json::Value) -> Result<RolloutShape, String> {
    let config = parse_config::<PpoConfig>("ppo", value)?;
    config.validate()?;
    Ok(RolloutShape {
        completions_per_prompt: 1,
        max_completion_length: config.max_completion_length,
        max_sampling_rounds: 1,
        training_passes: config.num_ppo_epochs,
    })
}

/// The rows of each minibatch of `count` completions: ceil(count / num_mini_batches) rows each,
/// the last taking the remainder; `num_mini_batches` of them, or fewer when the rows run out
/// first (5 rows in 4 minibatches: 2, 2, 1).
pub fn minibatches(count: usize, num_mini_batches: usize) -> Vec<std::ops::Range<usize>> {
    let size = count.div_ceil(num_mini_batches.max(1)).max(1);
    (0..count).step_by(size).map(|start| start..(start + size).min(count)).collect()
}

fn resume_entry(inputs: AlgorithmInputs, dir: &std::path::Path) -> Result<Box<dyn RlAlgorithm>, RlError> {
    let config = parse_config::<PpoConfig>("ppo", &inputs.config).map_err(RlError::Config)?;
    Ok(Box::new(Ppo::resume(inputs.policy, config, inputs.optim, dir)?))
}

fn validate_entry(value: &serde_json::Value) -> Result<(), String> {
    parse_config::<PpoConfig>("ppo", value)?.validate()
}

fn build_entry(inputs: AlgorithmInputs) -> Result<Box<dyn RlAlgorithm>, RlError> {
    let config = parse_config::<PpoConfig>("ppo", &inputs.config).map_err(RlError::Config)?;
    Ok(Box::new(Ppo::new(inputs.policy, config, inputs.optim, inputs.seed)?))
}

fn rows(tensor: Tensor<2>) -> Vec<Vec<f32>> {
    let [count, width] = tensor.dims();
    let values = tensor.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
    (0..count).map(|row| values[row * width..(row + 1) * width].to_vec()).collect()
}

impl Ppo {
    /// Starts PPO on `policy` (on an autodiff device): a zero-initialised value head, and a
    /// frozen copy of the policy (without LoRA adapters) as the reference. The value head is
    /// new, so it trains in full even when the policy trains only LoRA adapters (PEFT's
    /// `modules_to_save`).
    pub fn new(policy: CausalLm, config: PpoConfig, optim: OptimSettings, seed: u64) -> Result<Self, RlError> {
        config.validate().map_err(RlError::Config)?;
        optim.validate().map_err(RlError::Config)?;
        let device = policy.devices().into_iter().next().expect("the policy has parameters");
        let width = match policy.config() {
            policy_models::ModelConfig::GptNeo(c) => c.hidden_size,
            policy_models::ModelConfig::Qwen2(c) => c.hidden_size,
            policy_models::ModelConfig::Llama(c) => c.hidden_size,
        };
        // Zero-initialised: deterministic, and the first value estimates are 0 rather than noise.
        let value_head = LinearConfig::new(width, 1).with_initializer(burn::nn::Initializer::Zeros).init(&device);
        let reference = crate::algorithm::reference_policy(&policy);
        let value_trunk = match config.value_model {
            ValueModel::Shared => None,
            ValueModel::Separate if policy.has_adapters() => {
                return Err(RlError::Config(
                    "ppo.value_model = \"separate\" with policy.lora is not supported: use value_model = \"shared\" or train without LoRA".to_string(),
                ));
            }
            ValueModel::Separate => Some(policy.clone().map(&mut FreshParams)),
        };
        Ok(Self {
            optim: optim.clone(),
            updater: Updater::new(PolicyWithValueHead { policy, value_head, value_trunk }, AdamW::new(optim.adamw))
                .with_dtype(optim.dtype),
            reference,
            steps: 0,
            seed,
            kl_coef: config.kl_coef,
            config,
        })
    }
}

impl Ppo {
    /// Resumes from a checkpoint directory; `start` is the run's starting policy (the reference).
    pub fn resume(
        start: CausalLm,
        config: PpoConfig,
        optim: OptimSettings,
        dir: &std::path::Path,
    ) -> Result<Self, RlError> {
        let state = crate::algorithm::CheckpointState::read(dir)?;
        let device = start.devices().into_iter().next().expect("the policy has parameters");
        let policy = crate::algorithm::checkpoint_policy(&start, dir)?;
        let mut ppo = Self::new(start, config, optim, state.seed)?;
        let mut heads =
            policy_models::weights::WeightMap::open_files(dir, &[dir.join("value_head.safetensors")], &device)?;
        let width = ppo.updater.model().value_head.weight.dims()[0];
        let value_head = heads.linear("value_head", width, 1, true)?;
        heads.finish()?;
        let value_trunk = match ppo.config.value_model {
            ValueModel::Shared => None,
            ValueModel::Separate => Some(CausalLm::load_dir(&dir.join(VALUE_MODEL_DIR), &device)?),
        };
        let model = PolicyWithValueHead { policy, value_head, value_trunk };
        let optimizer = AdamW::load(ppo.optim.adamw, &model, &dir.join("optimizer.safetensors"))?;
        ppo.updater = Updater::new(model, optimizer).with_dtype(ppo.optim.dtype);
        ppo.steps = state.steps;
        let kl_state = dir.join(KL_STATE_FILE);
        if kl_state.exists() {
            let text = std::fs::read_to_string(&kl_state)
                .map_err(|e| RlError::Config(format!("reading {}: {e}", kl_state.display())))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| RlError::Config(format!("{}: {e}", kl_state.display())))?;
            ppo.kl_coef = value["kl_coef"].as_f64().ok_or_else(|| {
                RlError::Config(format!(
                    "{}: no number kl_coef; delete the checkpoint to restart the cell",
                    kl_state.display()
                ))
            })?;
        }
        Ok(ppo)
    }
}

impl RlAlgorithm for Ppo {
    fn name(&self) -> &'static str {
        "ppo"
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn policy(&self) -> &CausalLm {
        &self.updater.model().policy
    }

    fn into_policy(self: Box<Self>) -> CausalLm {
        self.updater.into_model().policy
    }

    fn save_checkpoint(&self, dir: &std::path::Path) -> Result<(), RlError> {
        let model = self.updater.model();
        model.policy.save_dir(&dir.join("policy"), None)?;
        let mut heads = policy_models::weights::WeightWriter::default();
        heads.linear("value_head", &model.value_head);
        heads.write(&dir.join("value_head.safetensors"))?;
        if let Some(trunk) = &model.value_trunk {
            trunk.save_dir(&dir.join(VALUE_MODEL_DIR), None)?;
        }
        self.updater.optimizer().save(model, &dir.join("optimizer.safetensors"))?;
        let kl_state = dir.join(KL_STATE_FILE);
        std::fs::write(&kl_state, serde_json::json!({ "kl_coef": self.kl_coef }).to_string())
            .map_err(|e| RlError::Config(format!("writing {}: {e}", kl_state.display())))?;
        crate::algorithm::CheckpointState { steps: self.steps, seed: self.seed }.write(dir)
    }

    fn train_step(&mut self, prompts: &[PromptItem], environment: &Environment<'_>) -> Result<Metrics, RlError> {
        let started = Instant::now();
        let model = self.updater.model();
        let device = model.policy.devices().into_iter().next().expect("the policy has parameters");
        let inference = self.updater.inference();
        let sampler = Sampler::Sample {
            temperature: self.config.temperature,
            top_k: None,
            top_p: (self.config.top_p < 1.0).then_some(self.config.top_p),
        };
        let rollout = rollout::sample(
            &inference.policy,
            prompts,
            1,
            self.config.max_completion_length,
            sampler,
            environment,
            step_seed(self.seed, self.steps, 0),
        );
        let scored = rollout::reward(&rollout, prompts, environment);
        let mut metrics = Metrics::new();
        rollout::rollout_metrics(&rollout, &scored, &mut metrics);
        metrics.insert("reward_std".to_string(), eval::stats::mean_std(&scored.total).std);

        let (input, completion_len) = rollout::scoring_input(&rollout, prompts, environment.pad_token_id);
        let temperature = self.config.temperature;
        let (old_logprobs, _, old_values) = inference.score(&input, completion_len, temperature);
        let (ref_logprobs, _) = policy_models::generate::completion_log_probs(
            &self.updater.in_working_dtype(self.reference.clone()),
            &input,
            completion_len,
            temperature,
        );
        let lengths = rollout.lengths();
        let old_values_host = rows(old_values);
        let scores = penalise_missing_eos(&scored.total, &rollout.stop_reasons, self.config.missing_eos_penalty);
        let step_config = PpoConfig { kl_coef: self.kl_coef, ..self.config.clone() };
        let old_logprobs_host = rows(old_logprobs);
        let targets =
            ppo_targets(&old_logprobs_host, &rows(ref_logprobs), &old_values_host, &scores, &lengths, &step_config);
        let mean_score = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len().max(1) as f64;
        for (name, value) in [
            ("kl", targets.kl),
            ("objective/kl", targets.sequence_kl),
            ("objective/kl_coef", self.kl_coef),
            ("objective/scores", mean_score),
            ("objective/non_score_reward", targets.non_score_reward),
            ("objective/rlhf_reward", targets.non_score_reward + mean_score),
        ] {
            metrics.insert(name.to_string(), value);
        }
        // Explained variance of the rollout's values against the returns, over real tokens.
        let real = |table: &[Vec<f32>]| -> Vec<f32> {
            table.iter().zip(&lengths).flat_map(|(row, &l)| row[..l].to_vec()).collect()
        };
        let returns_real = real(&targets.returns);
        let residual: Vec<f32> = returns_real.iter().zip(real(&old_values_host)).map(|(r, v)| r - v).collect();
        let variance = |values: &[f32]| eval::stats::mean_std(values).std.powi(2);
        metrics.insert(
            "val/explained_variance".to_string(),
            1.0 - variance(&residual) / variance(&returns_real).max(1e-12),
        );

        let count = rollout.len();
        let width = completion_len;
        // Minibatch tables: the rows `indices` of a host table ([N][T]).
        let gather = |values: &[Vec<f32>], indices: &[usize]| {
            let flat: Vec<f32> = indices.iter().flat_map(|&i| values[i].iter().copied()).collect();
            Tensor::<2>::from_data(TensorData::new(flat, [indices.len(), width]), &device)
        };
        let schedule = self.optim.schedule();
        let mut sums = UpdateSums::default();
        let mut learning_rate = 0.0;
        for epoch in 0..self.config.num_ppo_epochs {
            let order = epoch_order(count, self.seed, self.steps, epoch);
            for rows_range in minibatches(count, self.config.num_mini_batches) {
                let indices = &order[rows_range];
                let batch = rollout.select(indices);
                let mask = rollout::loss_mask(&batch, false, &device);
                let (old_logprobs, advantages) =
                    (gather(&old_logprobs_host, indices), gather(&targets.advantages, indices));
                let (old_values, returns) = (gather(&old_values_host, indices), gather(&targets.returns, indices));
                let pick = |t: &Tensor<2>, rows: std::ops::Range<usize>| t.clone().slice([rows, 0..width]);
                let minibatch_tokens = f64::from(mask.clone().sum().into_scalar::<f32>()).max(1.0);
                let entropy_coef = self.config.entropy_coef as f32;
                let config = &self.config;
                // One shard of rows per thread on the CPU, each loss its share of the minibatch's.
                let shard = |model: &PolicyWithValueHead, rows: std::ops::Range<usize>| {
                    let sub = batch.select(&rows.clone().collect::<Vec<usize>>());
                    let (sub_input, _) = rollout::scoring_input(&sub, prompts, environment.pad_token_id);
                    let (logps, entropies, vpred) = model.score(&sub_input, completion_len, temperature);
                    let sub_mask = pick(&mask, rows.clone());
                    let (mut loss, objective) = ppo_objective_share(
                        logps,
                        pick(&old_logprobs, rows.clone()),
                        pick(&advantages, rows.clone()),
                        vpred,
                        pick(&old_values, rows.clone()),
                        pick(&returns, rows),
                        sub_mask.clone(),
                        config,
                        minibatch_tokens,
                    );
                    let entropy = (entropies * sub_mask).sum() / minibatch_tokens as f32;
                    if entropy_coef > 0.0 {
                        loss = loss - entropy.clone().reshape([1]) * entropy_coef;
                    }
                    let entropy = f64::from(entropy.detach().into_scalar::<f32>());
                    (loss, (objective, entropy))
                };
                let not_finite = |bad: NonFinite| RlError::NotFinite {
                    step: self.steps + 1,
                    quantity: bad.quantity().to_string(),
                    value: bad.value(),
                };
                let (loss, grads, shards) = self.updater.backward(indices.len(), shard).map_err(not_finite)?;
                learning_rate = schedule.learning_rate_at(self.updater.optimizer().steps());
                let stats =
                    self.updater.update(grads, loss, self.optim.max_grad_norm, learning_rate).map_err(not_finite)?;
                for (objective, entropy) in shards {
                    sums.objective = sums.objective.plus(objective);
                    sums.entropy += entropy;
                }
                sums.grad_norm += stats.grad_norm;
                sums.update_norm += stats.update_norm;
                sums.updates += 1;
            }
        }
        let average = |sum: f64| sum / sums.updates.max(1) as f64;
        let objective = sums.objective;
        for (name, sum) in [
            ("loss/policy", objective.policy_loss),
            ("loss/value", objective.value_loss),
            ("policy/approxkl", objective.approxkl),
            ("policy/clipfrac", objective.clipfrac),
            ("val/clipfrac", objective.value_clipfrac),
            ("entropy", sums.entropy),
            ("grad_norm", sums.grad_norm),
            ("update_norm", sums.update_norm),
        ] {
            metrics.insert(name.to_string(), average(sum));
        }
        metrics.insert("learning_rate".to_string(), learning_rate);
        if let Some(adaptive) = &self.config.adaptive_kl {
            self.kl_coef = adaptive_kl_coef(self.kl_coef, targets.sequence_kl, count, adaptive);
        }
        self.steps += 1;
        let seconds = started.elapsed().as_secs_f64();
        metrics.insert("step_time".to_string(), seconds);
        metrics.insert("tokens_per_second".to_string(), lengths.iter().sum::<usize>() as f64 / seconds.max(1e-9));
        Ok(metrics)
    }
}
