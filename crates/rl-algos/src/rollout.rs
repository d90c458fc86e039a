//! Rollouts shared by the algorithms: sample completions on a non-autodiff copy of the policy
//! (so no autodiff graph is built or leaked), decode and reward them, and lay prompt +
//! completion out for scoring.
//!
//! Legend: `N` completions, `P` padded prompt length, `C` padded completion length.

use burn::tensor::{Device, Tensor, TensorData};
use policy_models::generate::{GenerationConfig, Sampler, StopReason, completion_log_probs, generate};
use policy_models::prefix::{SharedPrefixInput, shared_prefix_log_probs};
use policy_models::{CausalLm, StepInput};

use eval::stats::mean_std;

use crate::algorithm::{Environment, Metrics, PromptItem};
use crate::rewards::{RewardInput, ScoredBatch};

/// Completions of a batch of prompts, each prompt repeated `repeats` times (group layout:
/// prompt 0's completions first).
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Which prompt each completion answers.
    pub prompt_index: Vec<usize>,
    /// Completion ids, right-padded to C.
    pub completion_ids: Vec<Vec<i64>>,
    /// True at generated tokens.
    pub completion_mask: Vec<Vec<bool>>,
    /// Why each completion stopped.
    pub stop_reasons: Vec<StopReason>,
    /// Decoded completions.
    pub texts: Vec<String>,
}

impl Rollout {
    /// N.
    pub fn len(&self) -> usize {
        self.completion_ids.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.completion_ids.is_empty()
    }

    /// C.
    pub fn completion_len(&self) -> usize {
        self.completion_ids.first().map_or(0, Vec::len)
    }

    /// Generated tokens per completion.
    pub fn lengths(&self) -> Vec<usize> {
        self.completion_mask.iter().map(|row| row.iter().filter(|m| **m).count()).collect()
    }

    /// Puts completion `source` of `other` in place of completion `target`, re-padding every
    /// row to the longer width.
    pub fn replace(&mut self, target: usize, other: &Rollout, source: usize) {
        let width = self.completion_len().max(other.completion_len());
        let pad = self.completion_ids.iter().flatten().next().copied().unwrap_or(0);
        for (ids, mask) in self.completion_ids.iter_mut().zip(self.completion_mask.iter_mut()) {
            let pad_id = ids.last().copied().unwrap_or(pad);
            ids.resize(width, pad_id);
            mask.resize(width, false);
        }
        let mut ids = other.completion_ids[source].clone();
        let mut mask = other.completion_mask[source].clone();
        ids.resize(width, *ids.last().unwrap_or(&pad));
        mask.resize(width, false);
        self.completion_ids[target] = ids;
        self.completion_mask[target] = mask;
        self.stop_reasons[target] = other.stop_reasons[source];
        self.texts[target] = other.texts[source].clone();
    }

    /// Keeps the completions of `keep` (indices), in order.
    pub fn select(&self, keep: &[usize]) -> Rollout {
        Rollout {
            prompt_index: keep.iter().map(|&i| self.prompt_index[i]).collect(),
            completion_ids: keep.iter().map(|&i| self.completion_ids[i].clone()).collect(),
            completion_mask: keep.iter().map(|&i| self.completion_mask[i].clone()).collect(),
            stop_reasons: keep.iter().map(|&i| self.stop_reasons[i]).collect(),
            texts: keep.iter().map(|&i| self.texts[i].clone()).collect(),
        }
    }
}

/// The sampling seed of a step (and of a later round within it: GRPO's resampling, PPO's
/// minibatch order), different per step and round and the same on a resumed run.
pub fn step_seed(seed: u64, step: u64, round: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
}

/// Samples `repeats` completions per prompt with the inference copy of the policy.
pub fn sample(
    policy: &CausalLm,
    prompts: &[PromptItem],
    repeats: usize,
    max_new_tokens: usize,
    sampler: Sampler,
    environment: &Environment<'_>,
    seed: u64,
) -> Rollout {
    let prompt_index: Vec<usize> = (0..prompts.len()).flat_map(|p| std::iter::repeat_n(p, repeats)).collect();
    let inputs: Vec<Vec<i64>> = prompt_index.iter().map(|&p| prompts[p].prompt_ids.clone()).collect();
    let config = GenerationConfig {
        max_new_tokens,
        sampler,
        eos_token_ids: environment.eos_token_ids.clone(),
        pad_token_id: environment.pad_token_id,
        seed,
    };
    let decode = |ids: &[i64]| (environment.decode)(ids);
    let generation = generate(policy, &inputs, &config, &environment.stop_strings, Some(&decode));
    let texts = generation
        .completion_ids
        .iter()
        .zip(&generation.completion_mask)
        .map(|(ids, mask)| {
            let kept: Vec<i64> = ids.iter().zip(mask).filter(|(_, m)| **m).map(|(id, _)| *id).collect();
            (environment.decode)(&kept)
        })
        .collect();
    Rollout {
        prompt_index,
        completion_ids: generation.completion_ids,
        completion_mask: generation.completion_mask,
        stop_reasons: generation.stop_reasons,
        texts,
    }
}

/// Rewards of every completion.
pub fn reward(rollout: &Rollout, prompts: &[PromptItem], environment: &Environment<'_>) -> ScoredBatch {
    let inputs: Vec<RewardInput<'_>> = rollout
        .texts
        .iter()
        .zip(&rollout.prompt_index)
        .zip(rollout.lengths())
        .map(|((text, &p), completion_tokens)| RewardInput {
            prompt: &prompts[p].prompt_text,
            completion: text,
            answer: &prompts[p].answer,
            completion_tokens,
        })
        .collect();
    environment.rewards.score(&inputs)
}

/// Prompt (left-padded) followed by completion (right-padded), for scoring the completion
/// tokens; returns the input and C.
pub fn scoring_input(rollout: &Rollout, prompts: &[PromptItem], pad_token_id: i64) -> (StepInput, usize) {
    let prompt_len = rollout.prompt_index.iter().map(|&p| prompts[p].prompt_ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rollout.len());
    let mut mask = Vec::with_capacity(rollout.len());
    for (row, &p) in rollout.prompt_index.iter().enumerate() {
        let prompt = &prompts[p].prompt_ids;
        let mut row_ids = vec![pad_token_id; prompt_len - prompt.len()];
        row_ids.extend_from_slice(prompt);
        row_ids.extend_from_slice(&rollout.completion_ids[row]);
        let mut row_mask = vec![false; prompt_len - prompt.len()];
        row_mask.extend(std::iter::repeat_n(true, prompt.len()));
        row_mask.extend_from_slice(&rollout.completion_mask[row]);
        ids.push(row_ids);
        mask.push(row_mask);
    }
    (StepInput::from_padded(&ids, &mask), rollout.completion_len())
}

/// The rollout's completions grouped by prompt, each prompt once ([`policy_models::prefix`]).
pub fn shared_scoring_input(rollout: &Rollout, prompts: &[PromptItem], pad_token_id: i64) -> SharedPrefixInput {
    let row_prompts: Vec<&[i64]> = rollout.prompt_index.iter().map(|&p| prompts[p].prompt_ids.as_slice()).collect();
    SharedPrefixInput::new(&row_prompts, &rollout.completion_ids, &rollout.completion_mask, pad_token_id)
}

/// Per-token log-probs and entropies of the rollout's completions under `policy` at
/// `temperature`, [N, C] each (with gradients on an autodiff device). With
/// `share_prompt_prefix`, when rows share a prompt, each prompt runs once and its completions
/// attend over it ([`shared_prefix_log_probs`], the same numbers); otherwise every row runs
/// prompt + completion ([`scoring_input`]).
pub fn completion_scores(
    policy: &CausalLm,
    rollout: &Rollout,
    prompts: &[PromptItem],
    pad_token_id: i64,
    share_prompt_prefix: bool,
    temperature: f32,
) -> (Tensor<2>, Tensor<2>) {
    if share_prompt_prefix {
        let input = shared_scoring_input(rollout, prompts, pad_token_id);
        if input.shares_prompts() {
            return shared_prefix_log_probs(policy, &input, temperature);
        }
    }
    let (input, completion_len) = scoring_input(rollout, prompts, pad_token_id);
    completion_log_probs(policy, &input, completion_len, temperature)
}

/// Positions a scoring forward over `rows` of the rollout runs (a bound: prompts counted at the
/// longest prompt's length): R (Tp + C), or with `share_prompt_prefix` and a shared prompt,
/// (distinct prompts) Tp + R C.
pub fn scoring_positions(
    rollout: &Rollout,
    prompts: &[PromptItem],
    rows: std::ops::Range<usize>,
    share_prompt_prefix: bool,
) -> usize {
    let prompt_len = rollout.prompt_index.iter().map(|&p| prompts[p].prompt_ids.len()).max().unwrap_or(0);
    let completion_len = rollout.completion_len();
    let count = rows.len();
    let mut distinct: Vec<usize> = rollout.prompt_index[rows].to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if share_prompt_prefix && distinct.len() < count {
        distinct.len() * prompt_len + count * completion_len
    } else {
        count * (prompt_len + completion_len)
    }
}

/// The loss mask [N, C]: generated tokens, without the truncated completions when asked.
pub fn loss_mask(rollout: &Rollout, mask_truncated: bool, device: &Device) -> Tensor<2> {
    let width = rollout.completion_len();
    let values: Vec<f32> = rollout
        .completion_mask
        .iter()
        .zip(&rollout.stop_reasons)
        .flat_map(|(row, reason)| {
            let drop = mask_truncated && *reason == StopReason::Length;
            row.iter().map(move |&m| if m && !drop { 1.0 } else { 0.0 })
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [rollout.len(), width]), device)
}

/// TRL's reward and completion metrics: `reward`, `rewards/<fn>/mean`, `rewards/<fn>/std`,
/// `completions/mean_length`, `completions/clipped_ratio`; and `rewards/<fn>/auc/<check>` for a
/// graded reward beside a 0/1 one (see [`ranking_auc`]), with `rewards/<fn>/auc_within_prompt/<check>`
/// over pairs of the same prompt's completions ([`ranking_auc_within`]).
pub fn rollout_metrics(rollout: &Rollout, scored: &ScoredBatch, metrics: &mut Metrics) {
    metrics.insert("reward".to_string(), mean_std(&scored.total).mean);
    for (name, values) in &scored.per_function {
        let summary = mean_std(values);
        metrics.insert(format!("rewards/{name}/mean"), summary.mean);
        metrics.insert(format!("rewards/{name}/std"), summary.std);
    }
    // A learned reward logged beside a rule check (at weight 0, say) is judged on the policy's
    // current completions: its mean can climb while it ranks right answers above wrong ones no
    // better than chance, which is reward hacking.
    let is_check = |values: &[f32]| values.iter().all(|&v| v == 0.0 || v == 1.0);
    for (name, scores) in scored.per_function.iter().filter(|(_, values)| !is_check(values)) {
        for (check, labels) in scored.per_function.iter().filter(|(_, values)| is_check(values)) {
            if let Some(auc) = ranking_auc(scores, labels) {
                metrics.insert(format!("rewards/{name}/auc/{check}"), auc);
            }
            if rollout.prompt_index.len() == scores.len()
                && let Some(auc) = ranking_auc_within(scores, labels, &rollout.prompt_index)
            {
                metrics.insert(format!("rewards/{name}/auc_within_prompt/{check}"), auc);
            }
        }
    }
    let lengths: Vec<f64> = rollout.lengths().into_iter().map(|l| l as f64).collect();
    metrics.insert("completions/mean_length".to_string(), mean_std(&lengths).mean);
    let truncated = rollout.stop_reasons.iter().filter(|r| **r == StopReason::Length).count();
    metrics.insert("completions/clipped_ratio".to_string(), truncated as f64 / rollout.len().max(1) as f64);
}

/// The share of (passing, failing) pairs of completions under a 0/1 check `labels` that
/// `scores` orders right, ties counting half: the Mann-Whitney AUC, 0.5 for a score that knows
/// nothing of the check and 1 for one that separates it. `None` unless both outcomes occur.
pub fn ranking_auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    let (ordered, pairs) = ordered_pairs(scores, labels);
    (pairs > 0).then(|| ordered / pairs as f64)
}

/// [`ranking_auc`] over the pairs of completions of the same prompt only (`groups[i]` is the
/// prompt of completion i), pooled: how a learned reward orders answers to one question, which is
/// all GRPO's group-relative advantages use and what a verifier's within-question comparisons
/// measure. The step-wide AUC also compares answers to different questions, whose scores differ
/// by the question's own level (a model's likelihood is lower on a harder question), so it can
/// sit below chance for a score that ranks every question's answers right. `None` unless some
/// prompt has both outcomes (never with one completion per prompt, as PPO samples).
pub fn ranking_auc_within(scores: &[f32], labels: &[f32], groups: &[usize]) -> Option<f64> {
    let mut prompts: Vec<usize> = groups.to_vec();
    prompts.sort_unstable();
    prompts.dedup();
    let (mut ordered, mut pairs) = (0.0, 0usize);
    for prompt in prompts {
        let members: Vec<usize> = (0..scores.len()).filter(|&i| groups[i] == prompt).collect();
        let scores: Vec<f32> = members.iter().map(|&i| scores[i]).collect();
        let labels: Vec<f32> = members.iter().map(|&i| labels[i]).collect();
        let (o, p) = ordered_pairs(&scores, &labels);
        ordered += o;
        pairs += p;
    }
    (pairs > 0).then(|| ordered / pairs as f64)
}

/// (pairs ordered right, ties counting half; all (passing, failing) pairs).
fn ordered_pairs(scores: &[f32], labels: &[f32]) -> (f64, usize) {
    let passing: Vec<f32> = scores.iter().zip(labels).filter(|(_, l)| **l == 1.0).map(|(s, _)| *s).collect();
    let failing: Vec<f32> = scores.iter().zip(labels).filter(|(_, l)| **l != 1.0).map(|(s, _)| *s).collect();
    let ordered: f64 = passing
        .iter()
        .flat_map(|p| {
            failing.iter().map(move |f| {
                if p > f {
                    1.0
                } else if p == f {
                    0.5
                } else {
                    0.0
                }
            })
        })
        .sum();
    (ordered, passing.len() * failing.len())
}

/// Default token budget of a micro-batch (see [`micro_batch_rows`]).
///
/// A GRPO step on SmolLM2-135M (8 x 8 rows of 171 prompt + 64 completion tokens, f32, fused
/// head) peaked at 9.1 GB of RSS with 4096 (four micro-batches) and 4.2 GB with 1024 (sixteen;
/// TRL: 4.8 GB): activations cost about 1.7 MB a token there (30 layers), beside about 2.7 GB
/// of weights, gradients and AdamW moments.
pub const DEFAULT_MAX_TOKENS_PER_MICRO_BATCH: usize = 1024;

/// Rows per micro-batch of an update over `rows` rows of `padded_len` tokens: `steps`
/// micro-batches of equal size (the last smaller) when set, else the fewest micro-batches of at
/// most `max_tokens` tokens each (at least one row), balanced. A backward pass holds activations
/// in proportion to its tokens (and attention in proportion to rows x length²), so the budget
/// bounds a step's memory whatever the batch; losses are normalised by whole-batch totals, so
/// the split does not change the update.
pub fn micro_batch_rows(rows: usize, padded_len: usize, steps: Option<usize>, max_tokens: usize) -> usize {
    micro_batch_rows_by(rows, steps, max_tokens, |range| range.len() * padded_len)
}

pub use policy_models::optim::micro_batch_rows_by;

/// Rows per micro-batch of an update that scores `rollout` with `policy`:
/// [`micro_batch_rows_by`] with each micro-batch's tokens counted as its shards' forward passes
/// run them ([`policy_models::optim::shard_ranges`], [`scoring_positions`]).
pub fn scoring_micro_batch_rows(
    policy: &CausalLm,
    rollout: &Rollout,
    prompts: &[PromptItem],
    share: bool,
    steps: Option<usize>,
    max_tokens: usize,
) -> usize {
    let tokens = |rows: std::ops::Range<usize>| {
        let shards = policy_models::optim::shard_ranges(policy, rows.len());
        let positions = |shard: std::ops::Range<usize>| {
            scoring_positions(rollout, prompts, rows.start + shard.start..rows.start + shard.end, share)
        };
        shards.into_iter().map(positions).sum()
    };
    micro_batch_rows_by(rollout.len(), steps, max_tokens, tokens)
}

#[cfg(test)]
mod reward_metric_tests {
    #[test]
    fn ranking_auc_counts_ordered_pairs_and_half_the_ties() {
        use super::ranking_auc;
        // Passing: 0.9 and 0.2; failing: 0.5, 0.2 and 0.1. Of the 6 pairs, 0.9 beats all three,
        // 0.2 beats 0.1, ties 0.2 and loses to 0.5: 4.5 / 6.
        let auc = ranking_auc(&[0.9, 0.5, 0.2, 0.2, 0.1], &[1.0, 0.0, 1.0, 0.0, 0.0]).unwrap();
        assert!((auc - 0.75).abs() < 1e-12, "{auc}");
        assert_eq!(ranking_auc(&[0.3, 0.1], &[0.0, 1.0]), Some(0.0));
        assert_eq!(ranking_auc(&[0.3, 0.1], &[1.0, 1.0]), None);
    }

    #[test]
    fn the_within_prompt_auc_pools_only_pairs_of_one_prompt() {
        use super::{ranking_auc, ranking_auc_within};
        // Prompt 0 (an easy question, high scores) and prompt 1 (a hard one, low scores): each
        // ranks its right answer first, yet prompt 1's right answer scores below prompt 0's
        // wrong one.
        let scores = [0.9, 0.8, 0.3, 0.2, 0.1];
        let labels = [1.0, 0.0, 1.0, 0.0, 0.0];
        let groups = [0, 0, 1, 1, 1];
        assert_eq!(ranking_auc_within(&scores, &labels, &groups), Some(1.0));
        // Step-wide, 0.3 loses to 0.8: 5 of 6 pairs.
        assert!((ranking_auc(&scores, &labels).unwrap() - 5.0 / 6.0).abs() < 1e-12);
        // Pooled over pairs, not averaged over prompts: prompt 0 orders its 1 pair wrong,
        // prompt 1 its 2 pairs right: 2 of 3.
        let swapped = [0.8, 0.9, 0.3, 0.2, 0.1];
        assert!((ranking_auc_within(&swapped, &labels, &groups).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // One completion per prompt (PPO): no within-prompt pair.
        assert_eq!(ranking_auc_within(&scores, &labels, &[0, 1, 2, 3, 4]), None);
    }

    #[test]
    fn a_graded_reward_is_ranked_against_each_check() {
        use super::{Rollout, ScoredBatch, rollout_metrics};
        let scored = ScoredBatch {
            total: vec![0.0; 4],
            per_function: vec![
                ("reward_model".to_string(), vec![2.0, -1.0, 0.5, 0.0]),
                ("lenient_correct".to_string(), vec![1.0, 0.0, 0.0, 1.0]),
                ("strict_correct".to_string(), vec![0.0; 4]),
            ],
        };
        let rollout = Rollout {
            prompt_index: vec![],
            completion_ids: vec![],
            completion_mask: vec![],
            stop_reasons: vec![],
            texts: vec![],
        };
        let mut metrics = super::Metrics::new();
        rollout_metrics(&rollout, &scored, &mut metrics);
        // Passing 2.0 and 0.0 against failing -1.0 and 0.5: 3 of 4 pairs ordered.
        assert_eq!(metrics.get("rewards/reward_model/auc/lenient_correct"), Some(&0.75));
        // No completion passes the strict check, and checks are not ranked against each other.
        assert!(metrics.keys().filter(|key| key.contains("/auc/")).count() == 1, "{metrics:?}");
    }
}

#[cfg(test)]
mod micro_batch_tests {
    use super::micro_batch_rows;

    #[test]
    fn micro_batches_follow_the_steps_or_the_token_budget() {
        // Explicit steps: 64 rows in 16 micro-batches of 4, whatever the budget.
        assert_eq!(micro_batch_rows(64, 200, Some(16), 10), 4);
        assert_eq!(micro_batch_rows(10, 200, Some(3), 10), 4);
        // Budget: 20 rows of 200 tokens fit 4096; 64 rows need 4 micro-batches, balanced to 16.
        assert_eq!(micro_batch_rows(64, 200, None, 4096), 16);
        assert_eq!(micro_batch_rows(64, 32, None, 4096), 64);
        // A row longer than the budget still makes a micro-batch of one.
        assert_eq!(micro_batch_rows(5, 9000, None, 4096), 1);
        assert_eq!(micro_batch_rows(0, 10, None, 4096), 1);
        assert_eq!(micro_batch_rows(10, 200, None, 800), 4);
    }

    #[test]
    fn shared_prompts_count_once_per_forward_pass() {
        // 64 rows, groups of 8, prompts of 171 and completions of 64 tokens, two shards per
        // micro-batch each running its prompts once: 8 rows (one prompt in each half) are
        // 2 x 171 + 8 x 64 = 854 tokens, within 1024; 16 rows would be 1366.
        let group = |row: usize| row / 8;
        let shard_tokens = |range: std::ops::Range<usize>| {
            let half = range.len().div_ceil(2);
            [range.start..range.start + half, range.start + half..range.end]
                .into_iter()
                .filter(|shard| !shard.is_empty())
                .map(|shard| {
                    let mut groups: Vec<usize> = shard.clone().map(group).collect();
                    groups.dedup();
                    groups.len() * 171 + shard.len() * 64
                })
                .sum()
        };
        assert_eq!(super::micro_batch_rows_by(64, None, 1024, shard_tokens), 8);
        // Without sharing, the same budget takes 4 rows of 235 tokens.
        assert_eq!(micro_batch_rows(64, 235, None, 1024), 4);
    }
}
