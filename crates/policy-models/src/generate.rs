//! What the RL algorithms call: batched, KV-cached generation with greedy, temperature, top-k
//! and top-p sampling, and per-token log-probabilities (with entropies) of given completions.
//!
//! Legend: `B` batch, `P` padded prompt length, `N` new tokens, `V` vocabulary.

use std::sync::Arc;

use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::layers::{PackedWeights, StepInput};
use crate::model::CausalLm;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sampler {
    /// The most likely token (ties: the lowest id, as `torch.argmax`).
    Greedy,
    /// Sampling from softmax(logits / temperature), restricted to the `top_k` most likely
    /// tokens and then to the smallest set of those whose renormalised probability reaches
    /// `top_p`: transformers' temperature, top-k and top-p warpers, in that order.
    Sample {
        /// Divides the logits; 1 is the model's own distribution.
        temperature: f32,
        /// Keep only this many most likely tokens, and every token tied with the last of them
        /// (`None` or 0: all, as transformers' `top_k=0`).
        top_k: Option<usize>,
        /// Nucleus: keep the most likely tokens until their probability reaches this; always
        /// at least one (`None` or 1: all).
        top_p: Option<f32>,
    },
}

/// Settings of one generation call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Most tokens generated per row.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampler: Sampler,
    /// Tokens that end a row (included in the completion).
    pub eos_token_ids: Vec<i64>,
    /// Id fed for padding (never attended to).
    pub pad_token_id: i64,
    /// Seed of the sampler; the same seed, prompts and model give the same completions.
    pub seed: u64,
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It produced an end-of-sequence token.
    Eos,
    /// Its text contains a stop string.
    StopString,
    /// It reached `max_new_tokens` (a truncated completion).
    Length,
}

/// The output of [`generate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated ids per row, up to and including the token that stopped it; padded with
    /// `pad_token_id` to the longest row ([B, N]).
    pub completion_ids: Vec<Vec<i64>>,
    /// Log-probability of each generated token under the distribution it was sampled from
    /// (after temperature, top-k and top-p), [B, N]; 0 at padding.
    pub log_probs: Vec<Vec<f32>>,
    /// True at generated tokens, false at padding, [B, N].
    pub completion_mask: Vec<Vec<bool>>,
    /// Why each row stopped.
    pub stop_reasons: Vec<StopReason>,
}

/// Turns completion ids into text, to check stop strings.
pub type Decode<'a> = &'a (dyn Fn(&[i64]) -> String + Sync);

/// Rows below which a batch is not split across threads: a decode step over fewer rows is too
/// small to gain from a thread of its own.
const MIN_ROWS_PER_THREAD: usize = 8;

/// Generates continuations of `prompts` (unpadded token ids), left-padding them into one batch.
/// `stop_strings` end a row once its decoded completion contains one (`decode` turns ids into
/// text; with no stop strings it is not called).
///
/// Row `i` samples from its own random stream (the seed's ChaCha stream `i`), so a row's
/// completion depends on the seed, its prompt and its index, not on the rest of the batch. That
/// lets a large batch run as one sub-batch per thread: the per-step work of a small model is too
/// fine-grained for the tensor ops to keep several cores busy on their own.
///
/// Rows of a sub-batch with the same prompt (a GRPO group's completions) share its prompt step:
/// each distinct prompt runs once and its keys and values are copied to its rows, which then
/// sample from their own streams as before (the completions are those of one prompt step per row).
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    config: &GenerationConfig,
    stop_strings: &[String],
    decode: Option<Decode<'_>>,
) -> Generation {
    generate_with(model, prompts, config, stop_strings, decode, true)
}

/// [`generate`], with the prompt step shared by repeated prompts or run for every row.
fn generate_with(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    config: &GenerationConfig,
    stop_strings: &[String],
    decode: Option<Decode<'_>>,
    share_prompts: bool,
) -> Generation {
    use burn::module::Module;
    use rayon::prelude::*;
    let batch = prompts.len();
    let parts = rayon::current_num_threads().min(batch / MIN_ROWS_PER_THREAD).max(1);
    // The CPU backend decodes through packed weights (one copy for all threads), one sub-batch
    // per thread; GPU backends batch rows themselves.
    let cpu = model.devices().first().is_none_or(|device| *device == burn::tensor::Device::flex());
    let packed = cpu.then(|| Arc::new(PackedWeights::default()));
    if parts == 1 || !cpu {
        return generate_rows(model, prompts, 0, config, stop_strings, decode, packed, share_prompts);
    }
    let size = batch.div_ceil(parts);
    let pieces: Vec<Generation> = prompts
        .par_chunks(size)
        .enumerate()
        .map(|(part, rows)| {
            generate_rows(model, rows, part * size, config, stop_strings, decode, packed.clone(), share_prompts)
        })
        .collect();
    let mut completion_ids = Vec::with_capacity(batch);
    let mut log_probs = Vec::with_capacity(batch);
    let mut stop_reasons = Vec::with_capacity(batch);
    for piece in pieces {
        for ((ids, mask), (logs, reason)) in piece
            .completion_ids
            .into_iter()
            .zip(piece.completion_mask)
            .zip(piece.log_probs.into_iter().zip(piece.stop_reasons))
        {
            let length = mask.iter().filter(|m| **m).count();
            completion_ids.push(ids[..length].to_vec());
            log_probs.push(logs[..length].to_vec());
            stop_reasons.push(Some(reason));
        }
    }
    finish(completion_ids, log_probs, stop_reasons, config.pad_token_id)
}

/// [`generate`] on one sub-batch whose first row is row `first_row` of the whole batch.
#[allow(clippy::too_many_arguments)]
fn generate_rows(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    first_row: usize,
    config: &GenerationConfig,
    stop_strings: &[String],
    decode: Option<Decode<'_>>,
    packed: Option<Arc<PackedWeights>>,
    share_prompts: bool,
) -> Generation {
    let batch = prompts.len();
    let prompt_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    assert!(prompt_len > 0, "generate needs at least one non-empty prompt");
    let mut rngs: Vec<ChaCha8Rng> = (0..batch)
        .map(|row| {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream((first_row + row) as u64);
            rng
        })
        .collect();

    // The prompt step: left-padded ids and their mask.
    let left_padded = |prompt: &Vec<i64>| {
        let mut row = vec![config.pad_token_id; prompt_len - prompt.len()];
        row.extend_from_slice(prompt);
        row
    };
    let prompt_mask =
        |prompt: &Vec<i64>| -> Vec<bool> { (0..prompt_len).map(|i| i >= prompt_len - prompt.len()).collect() };
    let mut key_mask: Vec<Vec<bool>> = prompts.iter().map(prompt_mask).collect();
    let mut real_counts: Vec<i64> = prompts.iter().map(|prompt| prompt.len() as i64).collect();
    let mut cache = model.new_cache();
    if let Some(packed) = packed {
        cache = cache.with_packed_weights(packed);
    }
    let mut last = if share_prompts {
        // Each distinct prompt once (padded to the same length as the whole sub-batch, so its
        // rows see the same positions), then its keys, values and last logits copied to its rows.
        let mut distinct: Vec<&Vec<i64>> = Vec::new();
        let source: Vec<i64> = prompts
            .iter()
            .map(|prompt| {
                let at = distinct.iter().position(|seen| *seen == prompt).unwrap_or_else(|| {
                    distinct.push(prompt);
                    distinct.len() - 1
                });
                at as i64
            })
            .collect();
        let padded: Vec<Vec<i64>> = distinct.iter().map(|prompt| left_padded(prompt)).collect();
        let mask: Vec<Vec<bool>> = distinct.iter().map(|prompt| prompt_mask(prompt)).collect();
        let last = model.forward_last(&StepInput::from_padded(&padded, &mask), &mut cache); // [U, 1, V]
        if distinct.len() < batch {
            let source: Tensor<1, Int> = Tensor::from_data(TensorData::new(source, [batch]), &last.device());
            cache.select_rows(source.clone());
            last.select(0, source) // [B, 1, V]
        } else {
            last
        }
    } else {
        let padded: Vec<Vec<i64>> = prompts.iter().map(left_padded).collect();
        let logits = model.forward(&StepInput::from_padded(&padded, &key_mask), &mut cache); // [B, P, V]
        let [_, _, vocab] = logits.dims();
        logits.slice([0..batch, prompt_len - 1..prompt_len, 0..vocab])
    };
    let vocab = last.dims()[2];

    let mut completion_ids = vec![Vec::new(); batch];
    let mut log_probs = vec![Vec::new(); batch];
    let mut stop_reasons: Vec<Option<StopReason>> = vec![None; batch];
    for _ in 0..config.max_new_tokens {
        let host = last.into_data().try_to_vec::<f32>().expect("f32 logits"); // [B, V]
        // Rows that get a token this step; the others already stopped and feed padding.
        let active: Vec<bool> = stop_reasons.iter().map(Option::is_none).collect();
        let mut next_ids = Vec::with_capacity(batch);
        for row in 0..batch {
            if !active[row] {
                next_ids.push(config.pad_token_id);
                continue;
            }
            let (token, log_prob) = choose(&host[row * vocab..(row + 1) * vocab], config.sampler, &mut rngs[row]);
            completion_ids[row].push(token);
            log_probs[row].push(log_prob);
            next_ids.push(token);
            if config.eos_token_ids.contains(&token) {
                stop_reasons[row] = Some(StopReason::Eos);
            } else if let (false, Some(decode)) = (stop_strings.is_empty(), decode) {
                let text = decode(&completion_ids[row]);
                if stop_strings.iter().any(|stop| text.contains(stop.as_str())) {
                    stop_reasons[row] = Some(StopReason::StopString);
                }
            }
        }
        if stop_reasons.iter().all(Option::is_some) {
            break;
        }
        // One new position per row; padding of stopped rows is masked out of every later query.
        let mut positions = Vec::with_capacity(batch);
        let mut step_mask = Vec::new();
        for row in 0..batch {
            positions.push(real_counts[row]);
            key_mask[row].push(active[row]);
            real_counts[row] += i64::from(active[row]);
            step_mask.extend_from_slice(&key_mask[row]);
        }
        let input = StepInput { batch_size: batch, input_ids: next_ids, position_ids: positions, key_mask: step_mask };
        last = model.forward(&input, &mut cache);
    }
    finish(completion_ids, log_probs, stop_reasons, config.pad_token_id)
}

fn finish(
    completion_ids: Vec<Vec<i64>>,
    log_probs: Vec<Vec<f32>>,
    stop_reasons: Vec<Option<StopReason>>,
    pad: i64,
) -> Generation {
    let width = completion_ids.iter().map(Vec::len).max().unwrap_or(0);
    let completion_mask = completion_ids.iter().map(|ids| (0..width).map(|i| i < ids.len()).collect()).collect();
    let pad_to = |mut row: Vec<i64>| {
        row.resize(width, pad);
        row
    };
    let pad_log = |mut row: Vec<f32>| {
        row.resize(width, 0.0);
        row
    };
    Generation {
        completion_ids: completion_ids.into_iter().map(pad_to).collect(),
        log_probs: log_probs.into_iter().map(pad_log).collect(),
        completion_mask,
        stop_reasons: stop_reasons.into_iter().map(|reason| reason.unwrap_or(StopReason::Length)).collect(),
    }
}

/// Picks a token from one row of logits; returns it with its log-probability under the
/// distribution it was drawn from.
pub fn choose(logits: &[f32], sampler: Sampler, rng: &mut ChaCha8Rng) -> (i64, f32) {
    match sampler {
        Sampler::Greedy => {
            let best = greedy_index(logits);
            (best as i64, log_softmax_at(logits, best))
        }
        Sampler::Sample { temperature, top_k, top_p } => {
            let top_p = top_p.unwrap_or(1.0);
            if top_p < 1.0 {
                let candidates = nucleus(logits, temperature, top_k, top_p);
                let total: f64 = candidates.iter().map(|(_, p)| p).sum();
                let mut threshold = rng.random::<f64>() * total;
                let (index, weight) = *candidates
                    .iter()
                    .find(|candidate| {
                        threshold -= candidate.1;
                        threshold <= 0.0
                    })
                    .unwrap_or(&candidates[candidates.len() - 1]);
                return (index as i64, (weight / total).ln() as f32);
            }
            // Without top-p, the whole candidate list would be sorted for one draw: walk it in
            // the same order, sorting only as far as the draw reaches (see `walk_by_weight`).
            let weights = warped_weights(logits, temperature);
            let candidates = top_k_candidates(logits, top_k);
            let total: f64 = candidates.iter().map(|&index| weights[index]).sum();
            let mut threshold = rng.random::<f64>() * total;
            let walked = walk_by_weight(&weights, &candidates, |index| {
                threshold -= weights[index];
                threshold <= 0.0
            });
            let index = walked[walked.len() - 1];
            (index as i64, (weights[index] / total).ln() as f32)
        }
    }
}

/// The most likely token (ties: the lowest id, as `torch.argmax`).
fn greedy_index(logits: &[f32]) -> usize {
    let mut best = 0;
    for (index, &value) in logits.iter().enumerate() {
        if value > logits[best] {
            best = index;
        }
    }
    best
}

fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    (f64::from(logits[index] - max) - sum.ln()) as f32
}

/// The tokens a sampler can draw, most likely first, with their probabilities (summing to 1):
/// what transformers' warpers leave of `logits` (see [`Sampler::Sample`]). Greedy keeps one.
pub fn sampling_distribution(logits: &[f32], sampler: Sampler) -> Vec<(usize, f64)> {
    let candidates = match sampler {
        Sampler::Greedy => vec![(greedy_index(logits), 1.0)],
        Sampler::Sample { temperature, top_k, top_p } => nucleus(logits, temperature, top_k, top_p.unwrap_or(1.0)),
    };
    let total: f64 = candidates.iter().map(|(_, weight)| weight).sum();
    candidates.into_iter().map(|(index, weight)| (index, weight / total)).collect()
}

/// The tokens that survive transformers' warpers, applied in its order, each to what the
/// previous one left: temperature; top-k, which removes only the logits below the k-th largest
/// (every token tied with it stays; `None`, 0 or at least the vocabulary: off); top-p over the
/// top-k survivors renormalised, keeping the most likely tokens while the mass before them is
/// below `top_p` (at least one token; 1 or more: off). Returned most likely first (ties: the
/// lower id first), with unnormalised probabilities exp((logit - max) / temperature).
///
/// Where top-p's cut falls inside a group of tied tokens, the lower ids stay: transformers'
/// choice there follows torch's unstable sort, which has no fixed order for ties.
fn nucleus(logits: &[f32], temperature: f32, top_k: Option<usize>, top_p: f32) -> Vec<(usize, f64)> {
    let weights = warped_weights(logits, temperature);
    let candidates = top_k_candidates(logits, top_k);
    let kept = if top_p >= 1.0 {
        walk_by_weight(&weights, &candidates, |_| false)
    } else {
        let total: f64 = candidates.iter().map(|&index| weights[index]).sum();
        let mut mass = 0.0;
        walk_by_weight(&weights, &candidates, |index| {
            mass += weights[index] / total;
            mass >= f64::from(top_p)
        })
    };
    kept.into_iter().map(|index| (index, weights[index])).collect()
}

/// exp((logit - max) / temperature) of every token: the largest is 1.
fn warped_weights(logits: &[f32], temperature: f32) -> Vec<f64> {
    let temperature = f64::from(temperature.max(1e-6));
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits.iter().map(|&v| (f64::from(v - max) / temperature).exp()).collect()
}

/// The ids top-k keeps, in no particular order: every id when top-k is off (`None`, 0 or at
/// least the vocabulary), else the k largest logits and every logit tied with the k-th.
fn top_k_candidates(logits: &[f32], top_k: Option<usize>) -> Vec<usize> {
    let mut candidates: Vec<usize> = (0..logits.len()).collect();
    if let Some(k) = top_k.filter(|&k| k > 0 && k < logits.len()) {
        // The threshold is a logit, not a weight: weights far below the maximum underflow to
        // equal zeros, which would tie tokens whose logits differ.
        let (_, kth, rest) = candidates.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        let kth = logits[*kth];
        let ties: Vec<usize> = rest.iter().copied().filter(|&index| logits[index] == kth).collect();
        candidates.truncate(k);
        candidates.extend(ties);
    }
    candidates
}

/// Bounds of the weight bands [`walk_by_weight`] sorts one at a time, from the top: band `b`
/// holds the candidates with weight at most bound `b - 1` and above bound `b` (the last band:
/// all the rest). A draw or a nucleus usually ends in the first band, a few tokens of a
/// vocabulary of tens of thousands.
const WEIGHT_BANDS: [f64; 3] = [1e-2, 1e-4, 1e-8];

/// `candidates` in decreasing weight (ties: the lower id first), up to and including the first
/// for which `stop` is true (all of them if none is); `stop` sees them in that order.
///
/// The bands of [`WEIGHT_BANDS`] sorted one after another are the order of one sort of the
/// whole list, so only the bands the walk reaches are sorted: sorting all 49k candidates of a
/// SmolLM2 row for every sampled token cost more than the row's share of the decoding step.
fn walk_by_weight(weights: &[f64], candidates: &[usize], mut stop: impl FnMut(usize) -> bool) -> Vec<usize> {
    let by_weight = |a: &usize, b: &usize| weights[*b].total_cmp(&weights[*a]).then(a.cmp(b));
    // The first bound a weight is above; none (the last band) for the smallest and for NaN.
    let band_of = |weight: f64| WEIGHT_BANDS.iter().position(|&bound| weight > bound).unwrap_or(WEIGHT_BANDS.len());
    let mut walked = Vec::new();
    for band in 0..=WEIGHT_BANDS.len() {
        let mut members: Vec<usize> =
            candidates.iter().copied().filter(|&index| band_of(weights[index]) == band).collect();
        members.sort_unstable_by(by_weight);
        for index in members {
            walked.push(index);
            if stop(index) {
                return walked;
            }
        }
    }
    walked
}

/// Per-token log-probabilities and entropies of completions given their prompts, in one
/// forward pass. On an autodiff device the result carries gradients: RL losses are built on it.
///
/// `input` holds prompt and completion, left-padded ([B, P + N]); the completions are its last
/// `completion_len` positions. Logits are divided by `temperature` first (TRL does the same, so
/// that log-probs match the sampling distribution's temperature).
///
/// Only the N positions that predict completion tokens go through the LM head, fused with the
/// log-softmax and the gather ([`CausalLm::token_log_probs`]): no [B, P+N, V] logits are held
/// (for SmolLM2's vocabulary of 49152, 200 tokens of 64 rows are 2.5 GB of logits, and the
/// unfused backward pass holds several such tensors).
///
/// # Shapes
/// - returns (log_probs [B, N], entropies [B, N])
pub fn completion_log_probs(
    model: &CausalLm,
    input: &StepInput,
    completion_len: usize,
    temperature: f32,
) -> (Tensor<2>, Tensor<2>) {
    let hidden = model.hidden_states(input, &mut model.new_cache()); // [B, P+N, C]
    log_probs_from_hidden(model, hidden, input, completion_len, temperature)
}

/// As [`completion_log_probs`], from hidden states already computed for `input` ([B, P+N, C]):
/// for callers that also read them (a value head, say).
///
/// # Shapes
/// - returns (log_probs [B, N], entropies [B, N])
pub fn log_probs_from_hidden(
    model: &CausalLm,
    hidden: Tensor<3>,
    input: &StepInput,
    completion_len: usize,
    temperature: f32,
) -> (Tensor<2>, Tensor<2>) {
    let batch = input.batch_size;
    let total = input.seq_len();
    assert!(completion_len < total, "the input must hold at least one prompt token before the completion");
    let width = hidden.dims()[2];
    // The hidden state at position t predicts token t + 1.
    let predicting = hidden
        .slice([0..batch, total - completion_len - 1..total - 1, 0..width])
        .reshape([batch * completion_len, width]); // [B N, C]
    let targets: Vec<i64> = (0..batch)
        .flat_map(|b| input.input_ids[b * total + total - completion_len..(b + 1) * total].to_vec())
        .collect();
    let targets: Tensor<1, Int> =
        Tensor::from_data(TensorData::new(targets, [batch * completion_len]), &predicting.device());
    let (log_probs, entropies) = model.token_log_probs(predicting, targets, temperature);
    (log_probs.reshape([batch, completion_len]), entropies.reshape([batch, completion_len]))
}

/// The unfused [`completion_log_probs`], from logits already computed for `input` ([B, P+N, V]):
/// for callers that hold full logits anyway, and as the reference the fused head is tested
/// against.
///
/// # Shapes
/// - returns (log_probs [B, N], entropies [B, N])
pub fn log_probs_from_logits(
    logits: Tensor<3>,
    input: &StepInput,
    completion_len: usize,
    temperature: f32,
) -> (Tensor<2>, Tensor<2>) {
    let batch = input.batch_size;
    let total = input.seq_len();
    assert!(completion_len < total, "the input must hold at least one prompt token before the completion");
    let vocab = logits.dims()[2];
    // The logits at position t predict token t + 1.
    let predicting = logits.slice([0..batch, total - completion_len - 1..total - 1, 0..vocab]) / temperature;
    let log_probs = crate::fused::log_softmax_last(predicting); // [B, N, V]
    let targets: Vec<i64> = (0..batch)
        .flat_map(|b| input.input_ids[b * total + total - completion_len..(b + 1) * total].to_vec())
        .collect();
    let device = log_probs.device();
    let targets: Tensor<3, Int> = Tensor::from_data(TensorData::new(targets, [batch, completion_len, 1]), &device);
    let chosen = log_probs.clone().gather(2, targets).reshape([batch, completion_len]);
    let entropies = -(log_probs.clone().exp() * log_probs).sum_dim(2).reshape([batch, completion_len]);
    (chosen, entropies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nucleus_keeps_the_smallest_set_reaching_top_p() {
        // Probabilities 0.5, 0.3, 0.15, 0.05.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let ids = |kept: Vec<(usize, f64)>| kept.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(ids(nucleus(&logits, 1.0, None, 0.7)), vec![0, 1]);
        assert_eq!(ids(nucleus(&logits, 1.0, None, 0.5)), vec![0]);
        assert_eq!(ids(nucleus(&logits, 1.0, None, 0.96)), vec![0, 1, 2, 3]);
        assert_eq!(ids(nucleus(&logits, 1.0, Some(3), 1.0)), vec![0, 1, 2]);
    }

    #[test]
    fn top_k_zero_is_off_and_ties_at_the_kth_logit_stay() {
        let logits = [2.0f32, 1.0, 3.0, 1.0, 0.5];
        let ids = |kept: Vec<(usize, f64)>| kept.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(ids(nucleus(&logits, 1.0, Some(0), 1.0)), vec![2, 0, 1, 3, 4]);
        assert_eq!(ids(nucleus(&logits, 1.0, Some(3), 1.0)), vec![2, 0, 1, 3]);
        assert_eq!(ids(nucleus(&logits, 1.0, Some(9), 1.0)), vec![2, 0, 1, 3, 4]);
    }

    #[test]
    fn top_p_renormalises_over_top_k_and_cuts_ties_keeping_the_lower_ids() {
        let ids = |kept: Vec<(usize, f64)>| kept.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        // Top-k 2 of 0.4, 0.3, 0.2, 0.1 leaves 4/7 and 3/7: 4/7 alone reaches top-p 0.55 (0.4
        // of the whole vocabulary would not).
        let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        assert_eq!(ids(nucleus(&logits, 1.0, Some(2), 0.55)), vec![0]);
        assert_eq!(ids(nucleus(&logits, 1.0, None, 0.55)), vec![0, 1]);
        // 0.4, then three tokens of 0.2: the cut keeps the lower ids of the tied group.
        let logits: Vec<f32> = [0.2f32, 0.2, 0.4, 0.2].iter().map(|p| p.ln()).collect();
        assert_eq!(ids(nucleus(&logits, 1.0, None, 0.55)), vec![2, 0]);
        assert_eq!(ids(nucleus(&logits, 1.0, None, 0.7)), vec![2, 0, 1]);
    }

    /// The sampler before the banded walk: one sort of every candidate per draw.
    fn choose_by_full_sort(logits: &[f32], temperature: f32, top_k: Option<usize>, rng: &mut ChaCha8Rng) -> (i64, f32) {
        let weights = warped_weights(logits, temperature);
        let mut candidates = top_k_candidates(logits, top_k);
        candidates.sort_unstable_by(|a, b| weights[*b].total_cmp(&weights[*a]).then(a.cmp(b)));
        let total: f64 = candidates.iter().map(|&index| weights[index]).sum();
        let mut threshold = rng.random::<f64>() * total;
        let mut chosen = candidates[candidates.len() - 1];
        for &index in &candidates {
            threshold -= weights[index];
            if threshold <= 0.0 {
                chosen = index;
                break;
            }
        }
        (chosen as i64, (weights[chosen] / total).ln() as f32)
    }

    #[test]
    fn the_banded_walk_draws_what_one_full_sort_drew() {
        // Peaked and flat rows over a vocabulary wide enough for every band to be reached, with
        // repeated logits (ties across the walk).
        let mut source = ChaCha8Rng::seed_from_u64(7);
        let mut deepest_band = 0;
        for (row, (spread, temperature, top_k)) in
            [(12.0f32, 1.0f32, None), (3.0, 1.0, None), (30.0, 0.7, None), (12.0, 1.3, Some(50)), (0.5, 1.0, None)]
                .into_iter()
                .enumerate()
        {
            let logits: Vec<f32> =
                (0..4000).map(|_| (source.random::<f32>().powi(4) * spread * 8.0).round() / 8.0).collect();
            let (mut new, mut old) = (ChaCha8Rng::seed_from_u64(row as u64), ChaCha8Rng::seed_from_u64(row as u64));
            let sampler = Sampler::Sample { temperature, top_k, top_p: None };
            for draw in 0..3000 {
                let (token, log_prob) = choose(&logits, sampler, &mut new);
                let (expected, expected_log_prob) = choose_by_full_sort(&logits, temperature, top_k, &mut old);
                assert_eq!(token, expected, "row {row}, draw {draw}");
                assert!(
                    (log_prob - expected_log_prob).abs() <= 1e-6 * expected_log_prob.abs().max(1.0),
                    "row {row}, draw {draw}: {log_prob} vs {expected_log_prob}"
                );
                let weight = warped_weights(&logits, temperature)[token as usize];
                deepest_band = deepest_band.max(WEIGHT_BANDS.iter().take_while(|&&bound| weight <= bound).count());
            }
        }
        assert!(deepest_band >= 2, "some draws walked past two bands: {deepest_band}");
        // The last band, which a draw rarely reaches: the walk through every band is one sort.
        let weights: Vec<f64> =
            (0..3000).map(|i| 10f64.powi(-((i * 13) % 15)) * if i % 7 == 0 { 1.0 } else { 0.5 }).collect();
        let mut sorted: Vec<usize> = (0..3000).collect();
        sorted.sort_by(|a, b| weights[*b].total_cmp(&weights[*a]).then(a.cmp(b)));
        let candidates: Vec<usize> = (0..3000).rev().collect();
        assert_eq!(walk_by_weight(&weights, &candidates, |_| false), sorted);
        let mut seen = 0;
        assert_eq!(
            walk_by_weight(&weights, &candidates, |_| {
                seen += 1;
                seen == 2500
            }),
            sorted[..2500].to_vec()
        );
        assert!(weights[sorted[2500]] <= WEIGHT_BANDS[WEIGHT_BANDS.len() - 1], "the stop falls in the last band");
        // Top-p's nucleus is the same prefix of the sorted order as before.
        let logits: Vec<f32> = (0..4000).map(|i| ((i * 7919) % 4000) as f32 / 400.0).collect();
        let weights = warped_weights(&logits, 1.0);
        let mut sorted: Vec<usize> = (0..4000).collect();
        sorted.sort_by(|a, b| weights[*b].total_cmp(&weights[*a]).then(a.cmp(b)));
        let kept: Vec<usize> = nucleus(&logits, 1.0, None, 0.999_999).into_iter().map(|(index, _)| index).collect();
        assert_eq!(kept, sorted[..kept.len()].to_vec());
        assert!(kept.len() > 1000, "the nucleus reaches past the first band: {}", kept.len());
    }

    #[test]
    fn shared_prompt_steps_give_the_completions_of_one_prompt_step_per_row() {
        let device = burn::tensor::Device::flex();
        for preset in [crate::presets::Preset::TinyLlama, crate::presets::Preset::TinyGptNeo] {
            device.seed(3);
            let model = CausalLm::init(&preset.config(64, 3, 64), &device).unwrap();
            // Groups of repeated prompts of different lengths (left padding), interleaved with a
            // prompt seen once, and a prompt repeated at rows that are not adjacent.
            let (a, b, c) = (vec![5, 9, 4, 17, 2], vec![8, 1], vec![30, 31, 32]);
            let prompts = vec![a.clone(), a.clone(), a.clone(), b.clone(), b.clone(), c, a.clone(), b];
            for sampler in [
                Sampler::Sample { temperature: 1.0, top_k: None, top_p: None },
                Sampler::Sample { temperature: 0.8, top_k: Some(5), top_p: Some(0.9) },
            ] {
                let config =
                    GenerationConfig { max_new_tokens: 12, sampler, eos_token_ids: vec![3], pad_token_id: 0, seed: 5 };
                let shared = generate_with(&model, &prompts, &config, &[], None, true);
                let per_row = generate_with(&model, &prompts, &config, &[], None, false);
                assert_eq!(shared, per_row, "{preset:?}, {sampler:?}");
                // Rows of one prompt still draw their own completions.
                assert_ne!(shared.completion_ids[0], shared.completion_ids[1], "{preset:?}");
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_reports_its_log_prob() {
        let logits: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let sampler = Sampler::Sample { temperature: 1.0, top_k: None, top_p: None };
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            let (token, log_prob) = choose(&logits, sampler, &mut rng);
            counts[token as usize] += 1;
            assert!((log_prob - logits[token as usize]).abs() < 1e-5);
        }
        assert!((counts[0] as f64 / 20_000.0 - 0.7).abs() < 0.02, "{counts:?}");
        let (greedy, log_prob) = choose(&logits, Sampler::Greedy, &mut rng);
        assert_eq!(greedy, 0);
        assert!((log_prob - 0.7f32.ln()).abs() < 1e-5);
    }
}
