//! GRPO: group relative policy optimisation (Shao et al., 2024, DeepSeekMath, arXiv
//! 2402.03300), with the variants TRL users expect: clip-higher (`epsilon_high`, DAPO), the
//! loss aggregations `grpo`, `bnpo`, `dr_grpo` and `dapo`, `scale_rewards`, several passes per
//! rollout (`num_iterations`), truncated-completion masking, zero-variance group handling,
//! sequence-level importance sampling (GSPO), two-sided clipping (`delta`), high-entropy token
//! selection (`top_entropy_quantile`), an entropy bonus (`entropy_coef`) and a reference model
//! that follows the policy (`sync_ref_model`). Names and defaults are TRL 1.16's.
//!
//! The objective, per completion token t of completion i with advantage A_i:
//!   w_t   = logp_t - old_logp_t                                   (`importance_sampling_level = token`)
//!   w_t   = sum_s m_s (logp_s - old_logp_s) / max(1, sum_s m_s)   (`sequence`, GSPO: one weight per completion)
//!   ratio = exp(w_t);  ratio' = min(ratio, delta) when `delta` is set (INTELLECT-2), else ratio
//!   loss_t = -min(ratio' A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) A_i) e_t + beta KL_t
//!   KL_t = exp(ref - logp) - (ref - logp) - 1          (the k3 estimator, always >= 0)
//!   e_t = 1 when token t's entropy H_t >= the (1 - top_entropy_quantile) quantile of the entropies of the
//!         micro-batch's loss tokens (torch.quantile, linear interpolation), else 0; always 1 at the default 1.0
//! The KL term is *added* to the loss (penalising divergence from the reference policy); the
//! entropy mask e_t gates only the clipped term, as in TRL.
//!
//! Aggregation over the loss mask m (1 at completion tokens that count), for a batch split into
//! S micro-batches (gradient accumulation), summed over the micro-batches:
//!   `grpo`:    sum_i (sum_t m loss_t / max(1, sum_t m)) / N'
//!   `bnpo`:    per micro-batch, sum m loss / max(1, sum m over the micro-batch), divided by S (TRL: the
//!              token mean of each micro-batch, then the accumulation's 1/S)
//!   `dr_grpo`: sum m loss / (N' max_completion_length)
//!   `dapo`:    sum m loss / max(1, sum m over the whole batch)
//! where N' counts the completions of the batch, less those of zero-variance groups dropped by
//! `zero_std_groups = skip`. With equal micro-batches (TRL's only case) `grpo` and `dr_grpo` are
//! TRL's per-micro-batch means divided by S.
//!
//! Entropy bonus (`entropy_coef`, TRL 1.16's static coefficient, verl's `entropy_coeff`): the loss
//! becomes loss - entropy_coef H̄, with H̄ = sum m e H / max(1, sum m e) per micro-batch, divided by
//! S: the mean entropy of the tokens the policy term trains on, whatever `loss_type`, as TRL does
//! (entropies are differentiable, so the bonus pushes them up).
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
    /// Token mean over each micro-batch, divided by the number of micro-batches (TRL's `bnpo`
    /// under gradient accumulation).
    Bnpo,
    /// Sum over tokens / (N x max_completion_length) (Dr. GRPO): no length normalisation bias.
    DrGrpo,
    /// Token mean over the whole generation batch (DAPO); equal to `bnpo` without gradient
    /// accumulation.
    Dapo,
}

/// Where importance ratios live (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// One ratio per token (GRPO, PPO).
    #[default]
    Token,
    /// One ratio per completion, the exponential of its mean token log-ratio (GSPO, Zheng et al.,
    /// 2025, arXiv 2507.18071). GSPO pairs it with `loss_type = "grpo"`.
    Sequence,
}

/// What to do with groups whose rewards are all equal (their advantages are all zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroStdGroups {
    /// Keep them: they contribute only through the KL term (TRL's behaviour, by design: trl#5588).
    Keep,
    /// Drop them from the loss, the KL term included, and from its normalisers.
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
    /// Two-sided clipping (INTELLECT-2): the unclipped ratio is capped at `delta`, which bounds
    /// the loss of negative-advantage tokens whose ratio ran away. Default none; TRL advises a
    /// value above 1 + epsilon_high.
    pub delta: Option<f64>,
    /// Token- or sequence-level (GSPO) importance ratios. Default `token`.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Train the clipped term only on tokens whose entropy is in this top fraction of the
    /// micro-batch's (Wang et al., 2025, "Beyond the 80/20 rule", which advises 0.2). Default 1.0
    /// (every token). Below 1 each micro-batch costs one more forward pass (for the quantile).
    pub top_entropy_quantile: f64,
    /// Entropy bonus weight: the loss minus entropy_coef x the mean entropy of the trained tokens
    /// (TRL 1.16's static `entropy_coef`, verl's `entropy_coeff`). Default 0.0 (off).
    pub entropy_coef: f64,
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
    /// Move the reference towards the policy every `ref_model_sync_steps` optimizer steps:
    /// ref <- alpha policy + (1 - alpha) ref (TR-DPO, arXiv 2404.09656, as TRL). Needs beta > 0
    /// and a fully fine-tuned policy (TRL refuses PEFT models too); checkpoints then hold the
    /// moved reference (`reference/`). Default false.
    pub sync_ref_model: bool,
    /// alpha of `sync_ref_model`. Default 0.6.
    pub ref_model_mixup_alpha: f64,
    /// Optimizer steps between reference updates of `sync_ref_model`. Default 512.
    pub ref_model_sync_steps: u64,
    /// Split each update's completions into this many micro-batches, accumulating gradients
    /// before one optimizer step (bounds memory). `dapo`, `grpo` and `dr_grpo` normalise over
    /// the whole batch, so the split does not change their update; `bnpo` is a token mean per
    /// micro-batch, as TRL's. Default: as many as `max_tokens_per_micro_batch` asks.
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
            delta: None,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            top_entropy_quantile: 1.0,
            entropy_coef: 0.0,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            mask_truncated_completions: false,
            zero_std_groups: ZeroStdGroups::Keep,
            max_resample_tries: 3,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
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
        if self.max_completion_length == 0
            || self.num_iterations == 0
            || self.gradient_accumulation_steps == Some(0)
            || self.max_tokens_per_micro_batch == 0
        {
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
        if let Some(delta) = self.delta.filter(|delta| !(delta.is_finite() && *delta > 1.0)) {
            return Err(format!(
                "grpo.delta = {delta}: the cap on the ratio must be above 1 (TRL advises more than 1 + epsilon_high = {}); leave it out for one-sided clipping",
                1.0 + self.epsilon_high()
            ));
        }
        if !(0.0..=1.0).contains(&self.top_entropy_quantile) {
            return Err(format!(
                "grpo.top_entropy_quantile = {}: use a fraction in [0, 1] (1 trains on every token; the paper uses 0.2)",
                self.top_entropy_quantile
            ));
        }
        if !self.entropy_coef.is_finite() {
            return Err(format!(
                "grpo.entropy_coef = {}: use a finite number such as 0.001, or 0 for no bonus",
                self.entropy_coef
            ));
        }
        if self.beta < 0.0 || !self.beta.is_finite() {
            return Err(format!("grpo.beta = {}: the KL weight must be 0 or positive", self.beta));
        }
        if self.sync_ref_model {
            if self.beta == 0.0 {
                return Err("grpo.sync_ref_model = true with beta = 0: without a KL term there is no reference to synchronise; set beta > 0 or sync_ref_model = false".to_string());
            }
            if !(0.0..=1.0).contains(&self.ref_model_mixup_alpha) {
                return Err(format!(
                    "grpo.ref_model_mixup_alpha = {}: use a fraction in [0, 1] (TRL's default 0.6)",
                    self.ref_model_mixup_alpha
                ));
            }
            if self.ref_model_sync_steps == 0 {
                return Err("grpo.ref_model_sync_steps = 0: use at least 1 (TRL's default 512)".to_string());
            }
        }
        if !(self.temperature > 0.0) || !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "grpo.temperature = {} and top_p = {}: temperature must be positive and top_p in (0, 1]",
                self.temperature, self.top_p
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
    /// Share of tokens (of completions, at `sequence` level, as TRL) whose ratio fell below
    /// 1 - epsilon with a negative advantage.
    pub clip_ratio_low_mean: f64,
    /// Share of tokens (completions at `sequence` level) whose ratio (capped at `delta`) rose
    /// above 1 + epsilon_high with a positive advantage.
    pub clip_ratio_high_mean: f64,
    /// Share of tokens (completions at `sequence` level) clipped on either side.
    pub clip_ratio_region_mean: f64,
}

/// What a micro-batch's loss is normalised by, so that the sum of micro-batch losses is the
/// batch's loss as TRL accumulates it (see the module doc), and the micro-batch's entropy
/// threshold; computed once before a micro-batch is split into shards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchTotals {
    /// Completions of the whole batch that count (N'; skipped zero-variance groups excluded).
    pub sequences: usize,
    /// Loss-mask tokens in the whole batch (`dapo`).
    pub tokens: f32,
    /// Loss-mask tokens in this micro-batch (`bnpo`).
    pub micro_batch_tokens: f32,
    /// Tokens of this micro-batch the entropy bonus averages over (mask x entropy mask).
    pub entropy_tokens: f32,
    /// Micro-batches the batch is split into (S).
    pub micro_batches: usize,
    /// The micro-batch's entropy threshold when `top_entropy_quantile < 1`.
    pub entropy_threshold: Option<f32>,
}

/// TRL's `get_high_entropy_mask` threshold: the `1 - top_entropy_quantile` quantile of the
/// entropies at mask tokens, linearly interpolated as `torch.quantile`; `None` at quantile 1 (every
/// token trains) or without tokens (TRL then masks every token: `Some(inf)`).
pub fn entropy_threshold(entropies: &[f32], mask: &[f32], top_entropy_quantile: f64) -> Option<f32> {
    if top_entropy_quantile >= 1.0 {
        return None;
    }
    let mut values: Vec<f32> = entropies.iter().zip(mask).filter(|(_, m)| **m > 0.0).map(|(e, _)| *e).collect();
    if values.is_empty() {
        return Some(f32::INFINITY);
    }
    values.sort_by(f32::total_cmp);
    let position = (1.0 - top_entropy_quantile) * (values.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    let fraction = (position - low as f64) as f32;
    Some(values[low] + (values[high] - values[low]) * fraction)
}

/// Loss-mask tokens whose entropy reaches `threshold` (all mask tokens without one).
pub fn entropy_token_count(entropies: &[f32], mask: &[f32], threshold: Option<f32>) -> f32 {
    entropies.iter().zip(mask).filter(|(e, m)| **m > 0.0 && threshold.is_none_or(|t| **e >= t)).map(|(_, m)| *m).sum()
}

/// The GRPO loss and its metrics. With `totals`, the loss is this micro-batch's share of the
/// batch's loss (see [`BatchTotals`]); without, the batch is all there is (one micro-batch).
/// `entropies` (differentiable) are needed when `top_entropy_quantile < 1` or `entropy_coef != 0`.
///
/// # Shapes
/// - `per_token_logps`, `old_per_token_logps`, `ref_per_token_logps`, `entropies`, `mask`: [N, T]
///   (`mask` is 1 at completion tokens that count, 0 elsewhere)
/// - `advantages`: [N]
/// - returns a loss of shape [1]
#[allow(clippy::too_many_arguments)]
pub fn grpo_objective(
    per_token_logps: Tensor<2>,
    old_per_token_logps: Tensor<2>,
    ref_per_token_logps: Option<Tensor<2>>,
    entropies: Option<Tensor<2>>,
    advantages: Tensor<1>,
    mask: Tensor<2>,
    config: &GrpoConfig,
    totals: Option<BatchTotals>,
) -> (Tensor<1>, ObjectiveMetrics) {
    let [count, length] = per_token_logps.dims();
    let host = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
    let mask_host = host(mask.clone());
    let needs_entropies = config.top_entropy_quantile < 1.0 || config.entropy_coef != 0.0;
    assert!(!needs_entropies || entropies.is_some(), "top_entropy_quantile < 1 and entropy_coef need the entropies");
    let totals = totals.unwrap_or_else(|| {
        let entropy_host = entropies.as_ref().filter(|_| needs_entropies).map(|e| host(e.clone().detach()));
        let threshold =
            entropy_host.as_ref().and_then(|e| entropy_threshold(e, &mask_host, config.top_entropy_quantile));
        let tokens = mask_host.iter().sum::<f32>();
        BatchTotals {
            sequences: count,
            tokens,
            micro_batch_tokens: tokens,
            entropy_tokens: entropy_host.as_ref().map_or(tokens, |e| entropy_token_count(e, &mask_host, threshold)),
            micro_batches: 1,
            entropy_threshold: threshold,
        }
    });
    let advantages = advantages.reshape([count, 1]);
    let log_ratio = per_token_logps.clone() - old_per_token_logps;
    let log_weights = match config.importance_sampling_level {
        ImportanceSamplingLevel::Token => log_ratio,
        ImportanceSamplingLevel::Sequence => {
            let per_sequence = (log_ratio * mask.clone()).sum_dim(1) / mask.clone().sum_dim(1).clamp_min(1.0); // [N, 1]
            per_sequence.expand([count, length])
        }
    };
    let ratio = log_weights.exp();
    let (low, high) = (1.0 - config.epsilon, 1.0 + config.epsilon_high());
    let clipped = ratio.clone().clamp(low as f32, high as f32);
    // TRL caps the unclipped ratio after taking the clipped one from it, and reports clipping of
    // the capped ratio.
    let ratio = match config.delta {
        Some(delta) => ratio.clamp_max(delta as f32),
        None => ratio,
    };
    let unclipped_objective = ratio.clone() * advantages.clone();
    let clipped_objective = clipped * advantages.clone();
    let mut per_token_loss = -unclipped_objective.min_pair(clipped_objective);
    let entropy_mask = totals.entropy_threshold.map(|threshold| {
        let entropies = entropies.clone().expect("checked above").detach();
        entropies.greater_equal_elem(threshold).float() * mask.clone()
    });
    if let Some(entropy_mask) = &entropy_mask {
        per_token_loss = per_token_loss * entropy_mask.clone();
    }
    let kl = ref_per_token_logps.map(|reference| {
        let difference = reference - per_token_logps.clone();
        difference.clone().exp() - difference - 1.0
    });
    if let (Some(kl), true) = (&kl, config.beta != 0.0) {
        per_token_loss = per_token_loss + kl.clone() * config.beta as f32;
    }
    let masked = per_token_loss * mask.clone();
    let micro_batches = totals.micro_batches.max(1) as f32;
    let mut loss = match config.loss_type {
        LossType::Grpo => {
            let per_sequence =
                masked.sum_dim(1).reshape([count]) / mask.clone().sum_dim(1).reshape([count]).clamp_min(1.0);
            per_sequence.sum() / totals.sequences.max(1) as f32
        }
        LossType::Bnpo => masked.sum() / (totals.micro_batch_tokens.max(1.0) * micro_batches),
        LossType::Dapo => masked.sum() / totals.tokens.max(1.0),
        LossType::DrGrpo => masked.sum() / (totals.sequences.max(1) as f32 * config.max_completion_length as f32),
    };
    if config.entropy_coef != 0.0 {
        let entropies = entropies.expect("checked above");
        let effective_mask = entropy_mask.unwrap_or_else(|| mask.clone());
        let bonus = (entropies * effective_mask).sum() / (totals.entropy_tokens.max(1.0) * micro_batches);
        loss = loss - bonus * config.entropy_coef as f32;
    }
    // Metrics, without gradients.
    let ratio_host = host(ratio.detach());
    let advantages_host = advantages.detach().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
    let tokens: f64 = mask_host.iter().map(|&m| f64::from(m)).sum::<f64>().max(1.0);
    let (mut low_count, mut high_count) = (0.0f64, 0.0f64);
    let per_sequence = config.importance_sampling_level == ImportanceSamplingLevel::Sequence;
    for i in 0..count {
        // At sequence level TRL counts completions (every one, whatever its mask), not tokens.
        let columns = if per_sequence { 0..1 } else { 0..length };
        for t in columns {
            let m = if per_sequence { 1.0 } else { f64::from(mask_host[i * length + t]) };
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
    let clip_denominator = if per_sequence { count.max(1) as f64 } else { tokens };
    let kl_mean = kl.map_or(0.0, |kl| {
        let kl = host(kl.detach());
        kl.iter().zip(&mask_host).map(|(k, m)| f64::from(k * m)).sum::<f64>() / tokens
    });
    let metrics = ObjectiveMetrics {
        kl: kl_mean,
        clip_ratio_low_mean: low_count / clip_denominator,
        clip_ratio_high_mean: high_count / clip_denominator,
        clip_ratio_region_mean: (low_count + high_count) / clip_denominator,
    };
    (loss.reshape([1]), metrics)
}

/// The loss mask with `zero_std_groups = skip` applied, and N' (the completions that count):
/// a skipped completion's row is zeroed, so it gets no gradient at all, its KL term included,
/// and leaves every normaliser. Without `skip`, the mask as it is and N.
///
/// # Shapes
/// - `mask`: [N, T] row-major; `zero_std`: [N]
pub fn skip_zero_std(mask: &[f32], zero_std: &[bool], zero_std_groups: ZeroStdGroups) -> (Vec<f32>, usize) {
    let rows = zero_std.len();
    if zero_std_groups != ZeroStdGroups::Skip || rows == 0 {
        return (mask.to_vec(), rows);
    }
    let width = mask.len() / rows;
    let kept = mask
        .chunks(width.max(1))
        .zip(zero_std)
        .flat_map(|(row, &zero)| row.iter().map(move |&m| if zero { 0.0 } else { m }))
        .collect();
    (kept, zero_std.iter().filter(|zero| !**zero).count())
}

/// TRL's `reward_std` and `frac_reward_zero_std`: the std (Bessel-corrected) of every reward of
/// the batch, and the share of completions whose reward spread is zero, the spread being their
/// group's for `group` and `none` and the whole batch's for `batch` (the std the advantages are
/// divided by). Zero spread is exact equality (see [`group_advantages`]).
pub fn reward_spread(rewards: &[f32], num_generations: usize, scale: ScaleRewards) -> (f64, f64) {
    let reward_std = eval::stats::mean_std(rewards).std;
    let all_equal = |values: &[f32]| values.iter().all(|&value| value == values[0]);
    let zero = match scale {
        ScaleRewards::Batch => {
            if all_equal(rewards) {
                rewards.len()
            } else {
                0
            }
        }
        ScaleRewards::Group | ScaleRewards::None => {
            rewards.chunks(num_generations.max(1)).filter(|group| all_equal(group)).map(<[f32]>::len).sum()
        }
    };
    (reward_std, zero as f64 / rewards.len().max(1) as f64)
}

/// The parameters of a module, flattened, in visiting order.
struct Flattened(Vec<Tensor<1>>);

impl ModuleVisitor for Flattened {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let numel = value.shape().num_elements();
        self.0.push(value.reshape([numel]));
    }
}

/// Replaces each parameter p by alpha q + (1 - alpha) p, q the policy's parameter at the same
/// place in visiting order (the reference may have been reloaded from a checkpoint, with new ids).
struct MixIn {
    policy: std::vec::IntoIter<Tensor<1>>,
    alpha: f32,
}

impl ModuleMapper for MixIn {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let source = self.policy.next().expect("the reference and the policy have the same parameters");
        let alpha = self.alpha;
        param.map(move |reference| {
            let shape = reference.shape();
            assert_eq!(shape.num_elements(), source.dims()[0], "the reference and the policy have the same shapes");
            let source = source.to_device(&reference.device()).reshape(shape);
            reference * (1.0 - alpha) + source * alpha
        })
    }
}

/// TR-DPO's soft update of the reference, as TRL's `SyncRefModelCallback`:
/// ref <- alpha policy + (1 - alpha) ref, parameter by parameter (`policy` without autodiff).
pub fn mix_into_reference(reference: CausalLm, policy: &CausalLm, alpha: f64) -> CausalLm {
    let mut flattened = Flattened(Vec::new());
    policy.visit(&mut flattened);
    reference.map(&mut MixIn { policy: flattened.0.into_iter(), alpha: alpha as f32 })
}

// ---------------------------------------------------------------------------------------------
// The algorithm: rollout, rewards, advantages, then `num_iterations` updates.
// ---------------------------------------------------------------------------------------------

use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsAccumulator;
use burn::tensor::TensorData;
use policy_models::CausalLm;
use policy_models::generate::Sampler;
use policy_models::optim::{AdamW, NonFinite, Updater};

use crate::advantages::group_advantages;
use crate::algorithm::{
    AlgorithmEntry, AlgorithmInputs, Environment, Metrics, OptimSettings, PromptItem, RlAlgorithm, RlError,
    RolloutShape, parse_config,
};
use crate::rollout::{self, Rollout};

/// Sums over a step's micro-batches of the objective's metrics: the KL and the entropy weighted
/// by tokens, the clip shares by tokens (or completions, at the sequence level).
#[derive(Debug, Clone, Copy, Default)]
struct ObjectiveSums {
    kl: f64,
    clip_low: f64,
    clip_high: f64,
    clip_region: f64,
    entropy: f64,
}

impl ObjectiveSums {
    fn plus(self, other: Self) -> Self {
        Self {
            kl: self.kl + other.kl,
            clip_low: self.clip_low + other.clip_low,
            clip_high: self.clip_high + other.clip_high,
            clip_region: self.clip_region + other.clip_region,
            entropy: self.entropy + other.entropy,
        }
    }
}

/// GRPO training state: the policy, the frozen reference (when `beta > 0`), the optimizer.
pub struct Grpo {
    config: GrpoConfig,
    optim: OptimSettings,
    /// The policy and its optimizer.
    updater: Updater<CausalLm>,
    reference: Option<CausalLm>,
    steps: u64,
    seed: u64,
}

/// The registry entry.
pub const ENTRY: AlgorithmEntry = AlgorithmEntry {
    name: "grpo",
    validate: validate_entry,
    resolve: |value| crate::algorithm::resolved_config("grpo", value, GrpoConfig::validate),
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

impl Grpo {
    /// Starts GRPO on `policy` (on an autodiff device). With `beta > 0` a frozen copy of the
    /// policy becomes the reference; with `beta = 0` none is kept.
    pub fn new(policy: CausalLm, config: GrpoConfig, optim: OptimSettings, seed: u64) -> Result<Self, RlError> {
        config.validate().map_err(RlError::Config)?;
        optim.validate().map_err(RlError::Config)?;
        if config.sync_ref_model && policy.has_adapters() {
            return Err(RlError::Config(
                "grpo.sync_ref_model = true with a LoRA policy: its reference is the base with the adapters disabled, which cannot be mixed with the policy (TRL refuses PEFT models too); set sync_ref_model = false or train in full".to_string(),
            ));
        }
        let reference = (config.beta > 0.0).then(|| crate::algorithm::reference_policy(&policy));
        let updater = Updater::new(policy, AdamW::new(optim.adamw)).with_dtype(optim.dtype);
        Ok(Self { config, optim, updater, reference, steps: 0, seed })
    }

    /// Resumes from a checkpoint directory; `start` is the run's starting policy (the reference).
    pub fn resume(
        start: CausalLm,
        config: GrpoConfig,
        optim: OptimSettings,
        dir: &std::path::Path,
    ) -> Result<Self, RlError> {
        let state = crate::algorithm::CheckpointState::read(dir)?;
        let policy = crate::algorithm::checkpoint_policy(&start, dir)?;
        let mut grpo = Self::new(start, config, optim, state.seed)?;
        let optimizer = AdamW::load(grpo.optim.adamw, &policy, &dir.join("optimizer.safetensors"))?;
        grpo.updater = Updater::new(policy, optimizer).with_dtype(grpo.optim.dtype);
        grpo.steps = state.steps;
        // A synchronised reference has moved away from the start: the checkpoint holds it.
        if grpo.config.sync_ref_model {
            let reference = grpo.reference.as_ref().expect("sync_ref_model needs beta > 0, which keeps a reference");
            let device = reference.devices().into_iter().next().expect("the reference has parameters");
            grpo.reference = Some(CausalLm::load_dir(&dir.join("reference"), &device)?);
        }
        Ok(grpo)
    }

    /// Replaces completions of groups whose rewards are all equal with new samples, up to
    /// `max_resample_tries` rounds (DAPO's dynamic sampling). Returns the rounds used and the
    /// completions drawn beyond the first round's.
    fn resample_flat_groups(
        &self,
        inference: &CausalLm,
        prompts: &[PromptItem],
        environment: &Environment<'_>,
        rollout: &mut Rollout,
        rewards: &mut crate::rewards::ScoredBatch,
    ) -> (usize, usize) {
        let g = self.config.num_generations;
        let mut generated = 0;
        for round in 1..=self.config.max_resample_tries {
            let (_, zero_std) = group_advantages(&rewards.total, g, self.config.scale_rewards);
            let flat: Vec<usize> = (0..prompts.len()).filter(|&p| zero_std[p * g]).collect();
            if flat.is_empty() {
                return (round - 1, generated);
            }
            generated += flat.len() * g;
            let subset: Vec<PromptItem> = flat.iter().map(|&p| prompts[p].clone()).collect();
            let fresh = rollout::sample(
                inference,
                &subset,
                g,
                self.config.max_completion_length,
                self.sampler(),
                environment,
                rollout::step_seed(self.seed, self.steps, round as u64),
            );
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
        (self.config.max_resample_tries, generated)
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
        self.updater.model()
    }

    fn into_policy(self: Box<Self>) -> CausalLm {
        self.updater.into_model()
    }

    fn save_checkpoint(&self, dir: &std::path::Path) -> Result<(), RlError> {
        self.policy().save_dir(&dir.join("policy"), None)?;
        self.updater.optimizer().save(self.policy(), &dir.join("optimizer.safetensors"))?;
        if let (true, Some(reference)) = (self.config.sync_ref_model, &self.reference) {
            reference.save_dir(&dir.join("reference"), None)?;
        }
        crate::algorithm::CheckpointState { steps: self.steps, seed: self.seed }.write(dir)
    }

    fn train_step(&mut self, prompts: &[PromptItem], environment: &Environment<'_>) -> Result<Metrics, RlError> {
        let started = Instant::now();
        let g = self.config.num_generations;
        let device = self.updater.model().devices().into_iter().next().expect("the policy has parameters");
        // Rollouts run on a copy without autodiff: no graph is built, none can leak.
        let inference = self.updater.inference();
        let mut rollout = rollout::sample(
            &inference,
            prompts,
            g,
            self.config.max_completion_length,
            self.sampler(),
            environment,
            rollout::step_seed(self.seed, self.steps, 0),
        );
        let mut scored = rollout::reward(&rollout, prompts, environment);
        let mut metrics = Metrics::new();
        if self.config.zero_std_groups == ZeroStdGroups::Resample {
            let (rounds, generated) =
                self.resample_flat_groups(&inference, prompts, environment, &mut rollout, &mut scored);
            metrics.insert("resample_rounds".to_string(), rounds as f64);
            metrics.insert("resampled_generations".to_string(), generated as f64);
        }
        let (advantages, zero_std) = group_advantages(&scored.total, g, self.config.scale_rewards);
        rollout::rollout_metrics(&rollout, &scored, &mut metrics);
        let (reward_std, frac_reward_zero_std) = reward_spread(&scored.total, g, self.config.scale_rewards);
        metrics.insert("reward_std".to_string(), reward_std);
        metrics.insert("frac_reward_zero_std".to_string(), frac_reward_zero_std);

        let update_started = Instant::now();
        let completion_len = rollout.completion_len();
        let (pad, share) = (environment.pad_token_id, self.config.share_prompt_prefix);
        let mask = rollout::loss_mask(&rollout, self.config.mask_truncated_completions, &device);
        let mask_host = mask.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
        let (mask_host, sequences) = skip_zero_std(&mask_host, &zero_std, self.config.zero_std_groups);
        let mask = Tensor::<2>::from_data(TensorData::new(mask_host.clone(), [rollout.len(), completion_len]), &device);
        let advantages = Tensor::<1>::from_data(TensorData::new(advantages, [rollout.len()]), &device);
        let temperature = self.config.temperature;
        // Old log-probs are needed only when the policy moves between passes over the rollout.
        let old = (self.config.num_iterations > 1).then(|| {
            Tensor::from_inner(rollout::completion_scores(&inference, &rollout, prompts, pad, share, temperature).0)
        });
        let reference = self.reference.as_ref().map(|reference| {
            let reference = self.updater.in_working_dtype(reference.clone());
            Tensor::from_inner(rollout::completion_scores(&reference, &rollout, prompts, pad, share, temperature).0)
        });
        let schedule = self.optim.schedule();
        let count = rollout.len();
        let tokens_total = mask_host.iter().sum::<f32>();
        let micro = rollout::scoring_micro_batch_rows(
            self.updater.model(),
            &rollout,
            prompts,
            share,
            self.config.gradient_accumulation_steps,
            self.config.max_tokens_per_micro_batch,
        );
        let micro_batches = count.div_ceil(micro.max(1)).max(1);
        let per_sequence_clips = self.config.importance_sampling_level == ImportanceSamplingLevel::Sequence;
        let slice_rows = |t: &Tensor<2>, rows: std::ops::Range<usize>| t.clone().slice([rows, 0..completion_len]);
        // Token-weighted sums of the objective's metrics and of the entropy over the
        // micro-batches of every iteration, whose mean is reported (TRL logs them at each).
        // Clipping can only show after the first iteration: until the policy moves, ratios are 1.
        let mut weighted = ObjectiveSums::default();
        for _iteration in 0..self.config.num_iterations {
            let mut accumulator = GradientsAccumulator::new();
            let mut loss_sum = 0.0;
            for start in (0..count).step_by(micro.max(1)) {
                let end = (start + micro).min(count);
                let micro_mask = &mask_host[start * completion_len..end * completion_len];
                let micro_tokens = micro_mask.iter().sum::<f32>();
                // The entropy quantile is over the whole micro-batch (TRL's), which its shards
                // cannot see: one gradient-free pass of the current policy finds it, and its
                // entropies are the values the shards select tokens by (so that a token at the
                // threshold is not lost to rounding between the two passes).
                let (entropy_threshold, entropy_tokens, micro_entropies) = if self.config.top_entropy_quantile < 1.0 {
                    let sub = rollout.select(&(start..end).collect::<Vec<_>>());
                    let (_, entropies) =
                        rollout::completion_scores(&self.updater.inference(), &sub, prompts, pad, share, temperature);
                    let values = entropies.clone().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
                    let threshold = entropy_threshold(&values, micro_mask, self.config.top_entropy_quantile);
                    (
                        threshold,
                        entropy_token_count(&values, micro_mask, threshold),
                        Some(Tensor::<2>::from_inner(entropies)),
                    )
                } else {
                    (None, micro_tokens, None)
                };
                let totals = BatchTotals {
                    sequences,
                    tokens: tokens_total,
                    micro_batch_tokens: micro_tokens,
                    entropy_tokens,
                    micro_batches,
                    entropy_threshold,
                };
                // Each micro-batch runs as one shard of rows per thread on the CPU; a shard's
                // loss is its share of the batch loss (normalised by the batch totals).
                let shard = |policy: &CausalLm, shard_rows: std::ops::Range<usize>| {
                    let rows = start + shard_rows.start..start + shard_rows.end;
                    let sub = rollout.select(&rows.clone().collect::<Vec<_>>());
                    let (logps, entropies) = rollout::completion_scores(policy, &sub, prompts, pad, share, temperature);
                    // The pre-pass's values with this pass's gradient.
                    let entropies = match &micro_entropies {
                        Some(fixed) => {
                            entropies.clone() - entropies.detach()
                                + fixed.clone().slice([shard_rows.clone(), 0..completion_len])
                        }
                        None => entropies,
                    };
                    let old_logps =
                        old.as_ref().map_or_else(|| logps.clone().detach(), |old| slice_rows(old, rows.clone()));
                    let sub_mask = slice_rows(&mask, rows.clone());
                    let (loss, objective) = grpo_objective(
                        logps,
                        old_logps,
                        reference.as_ref().map(|reference| slice_rows(reference, rows.clone())),
                        Some(entropies.clone()),
                        advantages.clone().slice([rows.clone()]),
                        sub_mask.clone(),
                        &self.config,
                        Some(totals),
                    );
                    let sub_tokens = f64::from(sub_mask.clone().sum().into_scalar::<f32>());
                    let entropy_sum = f64::from((entropies.detach() * sub_mask).sum().into_scalar::<f32>());
                    // Sequence-level clip shares are over completions, as TRL reports them.
                    let clip_weight = if per_sequence_clips { rows.len() as f64 } else { sub_tokens };
                    let sums = ObjectiveSums {
                        kl: objective.kl * sub_tokens,
                        clip_low: objective.clip_ratio_low_mean * clip_weight,
                        clip_high: objective.clip_ratio_high_mean * clip_weight,
                        clip_region: objective.clip_ratio_region_mean * clip_weight,
                        entropy: entropy_sum,
                    };
                    (loss, sums)
                };
                let rows = end - start;
                let not_finite = |bad: NonFinite| RlError::NotFinite {
                    step: self.steps + 1,
                    quantity: bad.quantity().to_string(),
                    value: bad.value(),
                };
                let (loss, grads, shard_sums) = self.updater.backward(rows, shard).map_err(not_finite)?;
                loss_sum += loss;
                for sums in shard_sums {
                    weighted = weighted.plus(sums);
                }
                accumulator.accumulate(self.updater.model(), grads);
            }
            let learning_rate = schedule.learning_rate_at(self.updater.optimizer().steps());
            let not_finite = |bad: NonFinite| RlError::NotFinite {
                step: self.steps + 1,
                quantity: bad.quantity().to_string(),
                value: bad.value(),
            };
            let stats = self
                .updater
                .update(accumulator.grads(), loss_sum, self.optim.max_grad_norm, learning_rate)
                .map_err(not_finite)?;
            if self.config.sync_ref_model
                && self.updater.optimizer().steps().is_multiple_of(self.config.ref_model_sync_steps)
            {
                let reference = self.reference.take().expect("sync_ref_model needs beta > 0, which keeps a reference");
                self.reference = Some(mix_into_reference(
                    reference,
                    &self.updater.model().valid(),
                    self.config.ref_model_mixup_alpha,
                ));
            }
            metrics.insert("loss".to_string(), stats.loss);
            metrics.insert("grad_norm".to_string(), stats.grad_norm);
            metrics.insert("update_norm".to_string(), stats.update_norm);
            metrics.insert("learning_rate".to_string(), learning_rate);
        }
        let iterations = self.config.num_iterations as f64;
        let tokens = f64::from(tokens_total).max(1.0) * iterations;
        let clip_weight = if per_sequence_clips { count.max(1) as f64 * iterations } else { tokens };
        metrics.insert("kl".to_string(), weighted.kl / tokens);
        metrics.insert("entropy".to_string(), weighted.entropy / tokens);
        metrics.insert("clip_ratio/low_mean".to_string(), weighted.clip_low / clip_weight);
        metrics.insert("clip_ratio/high_mean".to_string(), weighted.clip_high / clip_weight);
        metrics.insert("clip_ratio/region_mean".to_string(), weighted.clip_region / clip_weight);
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
