//! Held-out evaluation: greedy completions scored with the template's answer format, and maj@k.

use eval::{AccuracySummary, score_completion};
use policy_models::generate::{GenerationConfig, Sampler, generate};
use policy_models::{CausalLm, PolicyTokenizer};
use prompting::PromptBuilder;
use serde::{Deserialize, Serialize};
use tasks::Problem;

use crate::study::config::Study;
use crate::study::progress::Progress;
use crate::study::prompts::{encode_prompt, fit};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Sample {
    pub(crate) question: String,
    pub(crate) answer: String,
    pub(crate) completion: String,
    pub(crate) strict: bool,
    pub(crate) lenient: bool,
}

/// Longest prompt that leaves room for `max_new_tokens` within the model's positions.
pub(crate) fn prompt_limit(study: &Study, policy: &CausalLm, max_new_tokens: usize) -> usize {
    let positions = policy.config().max_positions().unwrap_or(usize::MAX);
    positions.min(study.policy.max_length).saturating_sub(max_new_tokens).max(8)
}

pub(crate) struct Evaluation {
    pub(crate) accuracy: AccuracySummary,
    pub(crate) samples: Vec<Sample>,
}

/// Completions of `policy` for `problems` with `sampler`, up to `max_new_tokens` each, cut at the
/// template's stop strings; a bar named `label` counts the problems done.
#[allow(clippy::too_many_arguments, reason = "the evaluation's whole context")]
pub(crate) fn complete(
    study: &Study,
    policy: &CausalLm,
    tokenizer: &PolicyTokenizer,
    builder: &PromptBuilder,
    problems: &[Problem],
    (sampler, max_new_tokens): (Sampler, usize),
    seed: u64,
    progress: (&Progress, &str),
) -> anyhow::Result<Vec<String>> {
    let stops: Vec<String> = study.policy.template.stop_sequences().iter().map(|s| s.to_string()).collect();
    let decode =
        |ids: &[i64]| tokenizer.decode(&ids.iter().map(|&id| id as u32).collect::<Vec<_>>(), true).unwrap_or_default();
    let config = GenerationConfig {
        max_new_tokens,
        sampler,
        eos_token_ids: tokenizer.eos_ids.iter().map(|&id| i64::from(id)).collect(),
        pad_token_id: tokenizer.pad_id.map_or(0, i64::from),
        seed,
    };
    let limit = prompt_limit(study, policy, max_new_tokens);
    let mut completions = Vec::with_capacity(problems.len());
    let mut bar = progress.0.bar(problems.len() as u64, progress.1, 2);
    for chunk in problems.chunks(study.evaluation.batch_size.max(1)) {
        let bos = tokenizer.prepended_bos().map(i64::from);
        let prompts: Vec<Vec<i64>> = chunk
            .iter()
            .map(|p| Ok(fit(encode_prompt(tokenizer, builder, &builder.render(&p.question)?)?, limit, bos)))
            .collect::<anyhow::Result<_>>()?;
        let generation = generate(policy, &prompts, &config, &stops, Some(&decode));
        for (ids, mask) in generation.completion_ids.iter().zip(&generation.completion_mask) {
            let kept: Vec<i64> = ids.iter().zip(mask).filter(|(_, m)| **m).map(|(id, _)| *id).collect();
            let mut completion = decode(&kept);
            // Cut at a stop string, as a user of the completion would.
            if let Some(cut) = stops.iter().filter_map(|stop| completion.find(stop.as_str())).min() {
                completion.truncate(cut);
            }
            completions.push(completion);
        }
        bar.inc(chunk.len() as u64);
    }
    Ok(completions)
}

/// Greedy answers to the held-out problems, scored.
pub(crate) fn evaluate(
    study: &Study,
    policy: &CausalLm,
    tokenizer: &PolicyTokenizer,
    builder: &PromptBuilder,
    test: &[Problem],
    progress: &Progress,
) -> anyhow::Result<Evaluation> {
    let format = study.policy.template.answer_format();
    let completions = complete(
        study,
        policy,
        tokenizer,
        builder,
        test,
        (Sampler::Greedy, study.evaluation.max_new_tokens),
        0,
        (progress, "evaluation (greedy)"),
    )?;
    let mut scores = Vec::with_capacity(test.len());
    let mut samples = Vec::with_capacity(test.len());
    for (problem, completion) in test.iter().zip(completions) {
        let score = score_completion(&completion, &problem.answer, format);
        samples.push(Sample {
            question: problem.question.clone(),
            answer: problem.answer.clone(),
            completion,
            strict: score.strict,
            lenient: score.lenient,
        });
        scores.push(score);
    }
    Ok(Evaluation { accuracy: AccuracySummary::from_scores(&scores), samples })
}

/// `draws` sampled completions of each of `problems`, as `[problem][draw]`: draw `d` is one
/// [`complete`] call seeded with `seed * 1000 + d + 1`, its bar named `label(d)`.
pub(crate) fn sample_draws(
    study: &Study,
    (policy, tokenizer, builder): (&CausalLm, &PolicyTokenizer, &PromptBuilder),
    problems: &[Problem],
    (sampler, max_new_tokens): (Sampler, usize),
    draws: usize,
    seed: u64,
    (progress, label): (&Progress, &dyn Fn(usize) -> String),
) -> anyhow::Result<Vec<Vec<String>>> {
    let mut samples: Vec<Vec<String>> = vec![Vec::with_capacity(draws); problems.len()];
    for draw in 0..draws {
        let completions = complete(
            study,
            policy,
            tokenizer,
            builder,
            problems,
            (sampler, max_new_tokens),
            seed.wrapping_mul(1000).wrapping_add(draw as u64 + 1),
            (progress, &label(draw)),
        )?;
        for (slot, completion) in samples.iter_mut().zip(completions) {
            slot.push(completion);
        }
    }
    Ok(samples)
}

/// maj@k: `maj_k` sampled completions per problem, the most common lenient answer wins.
pub(crate) fn majority_accuracy(
    study: &Study,
    policy: &CausalLm,
    tokenizer: &PolicyTokenizer,
    builder: &PromptBuilder,
    test: &[Problem],
    seed: u64,
    progress: &Progress,
) -> anyhow::Result<f64> {
    let format = study.policy.template.answer_format();
    let sampler = Sampler::Sample { temperature: study.evaluation.maj_temperature, top_k: None, top_p: None };
    let label = |draw: usize| format!("maj@{} draw {}", study.evaluation.maj_k, draw + 1);
    let drawn = sample_draws(
        study,
        (policy, tokenizer, builder),
        test,
        (sampler, study.evaluation.max_new_tokens),
        study.evaluation.maj_k,
        seed,
        (progress, &label),
    )?;
    let answers: Vec<Vec<Option<String>>> = drawn
        .iter()
        .map(|completions| {
            completions
                .iter()
                .map(|completion| {
                    eval::extract::lenient(completion, format).as_deref().and_then(tasks::normalize_number)
                })
                .collect()
        })
        .collect();
    let correct = test
        .iter()
        .zip(&answers)
        .filter(|(problem, votes)| {
            eval::stats::majority_answer(votes.iter().map(Option::as_deref)) == Some(problem.answer.as_str())
        })
        .count();
    Ok(correct as f64 / test.len().max(1) as f64)
}
