//! Comparison pairs for reward-model training: (prompt, chosen, rejected), where chosen is a
//! correct worked solution and rejected is the same solution spoiled in one of three ways:
//!
//! - a corrupted step whose error propagates: one `a op b = c` line gets a wrong result, every
//!   later line that used it is recomputed from the wrong value, and the final answer follows;
//! - a wrong final answer after a correct derivation;
//! - a broken format (the answer marker or tags removed; in plain text, half the time the answer
//!   is given as `The answer is N.` instead of GSM8K's `#### N`).
//!
//! Pairs are built from whichever split is given: training pairs from train, held-out pairs from
//! test only. Generation is deterministic for a seed.
//!
//! A corrupted step or wrong answer also records where the error is (`rejected_error`, the
//! bytes of the wrong number in `rejected`): token-level labels for the reward model's optional
//! auxiliary loss ([`crate::train::RewardTrainingConfig::token_loss_weight`]), as process
//! supervision labels the first wrong step.

use std::ops::Range;
use std::sync::LazyLock;

use prompting::Template;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use regex::Regex;
use serde::{Deserialize, Serialize};
use tasks::{Problem, SplitProblems};

/// How the rejected completion was spoiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    /// One step computed wrongly, the error carried to the answer.
    CorruptedStep,
    /// A correct derivation with a wrong final answer.
    WrongAnswer,
    /// The answer format broken.
    BrokenFormat,
    /// A policy sample judged wrong, against a policy sample judged right.
    PolicySample,
}

/// One comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    /// The question (what the reward model sees before the completion).
    pub prompt: String,
    /// The better completion.
    pub chosen: String,
    /// The worse completion.
    pub rejected: String,
    /// How `rejected` was made.
    pub corruption: Corruption,
    /// The bytes of `rejected` that hold the error: the wrong result of a corrupted step, or a
    /// wrong final answer; `None` for a broken format and for policy samples.
    #[serde(default)]
    pub rejected_error: Option<Range<usize>>,
}

static STEP: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(-?\d+) ([+\-*]) (-?\d+) = (-?\d+)$").expect("valid regex"));

/// A nearby wrong value: c + d with d in [-5, 5] \ {0}, scaled for large values.
fn nearby(rng: &mut ChaCha8Rng, value: i64) -> i64 {
    let scale = (value.abs() / 20).max(1);
    loop {
        let delta = rng.random_range(-5..=5i64) * scale;
        if delta != 0 {
            return value + delta;
        }
    }
}

/// Corrupts one step of an arithmetic solution (lines `a op b = c`) and propagates the error.
/// Returns the new solution, its answer and the index of the corrupted line, or `None` when no
/// line has that form.
pub fn corrupt_step(solution: &str, rng: &mut ChaCha8Rng) -> Option<(String, String, usize)> {
    let mut lines: Vec<String> = solution.lines().map(str::to_string).collect();
    let steps: Vec<usize> = (0..lines.len()).filter(|&i| STEP.is_match(&lines[i])).collect();
    if steps.is_empty() {
        return None;
    }
    let chosen = steps[rng.random_range(0..steps.len())];
    let captures = STEP.captures(&lines[chosen])?;
    let old: i64 = captures[4].parse().ok()?;
    let mut replacements = vec![(old, nearby(rng, old))];
    lines[chosen] = format!("{} {} {} = {}", &captures[1], &captures[2], &captures[3], replacements[0].1);
    for line in lines.iter_mut().skip(chosen + 1) {
        let Some(captures) = STEP.captures(line) else { continue };
        let operand = |text: &str| -> i64 {
            let value: i64 = text.parse().unwrap_or(0);
            replacements.iter().find(|(from, _)| *from == value).map_or(value, |(_, to)| *to)
        };
        let (left, right) = (operand(&captures[1]), operand(&captures[3]));
        let result = match &captures[2] {
            "+" => left + right,
            "-" => left - right,
            _ => left * right,
        };
        let previous: i64 = captures[4].parse().unwrap_or(result);
        let op = captures[2].to_string();
        *line = format!("{left} {op} {right} = {result}");
        replacements.push((previous, result));
    }
    let answer = lines.iter().rev().find_map(|line| STEP.captures(line).map(|c| c[4].to_string()))?;
    Some((lines.join("\n"), answer, chosen))
}

/// The bytes of line `line`'s result (after its last `= `) where `solution` appears in
/// `response`.
fn result_range(response: &str, solution: &str, line: usize) -> Option<Range<usize>> {
    let mut start = response.find(solution)?;
    for text in solution.split('\n').take(line) {
        start += text.len() + 1;
    }
    let text = solution.split('\n').nth(line)?;
    let result = text.rfind("= ")? + 2;
    Some(start + result..start + text.len())
}

/// Removes what the template's strict scoring reads: GSM8K's `#### N` line (dropped, or, every
/// other time, replaced by the free-text `The answer is N.` that a base model writes instead),
/// or the `<answer>` tags.
fn break_format(template: Template, problem: &Problem, rng: &mut ChaCha8Rng) -> String {
    match template {
        Template::Plain if rng.random_bool(0.5) => {
            format!(
                "{}\n{}\nThe answer is {}.",
                prompting::template::PLAIN_ANSWER_CUE,
                problem.solution,
                problem.answer
            )
        }
        Template::Plain => format!("{}\n{}", prompting::template::PLAIN_ANSWER_CUE, problem.solution),
        Template::XmlReasoning | Template::ThinkAnswer => {
            template.response(problem).replace("<answer>", "").replace("</answer>", "")
        }
    }
}

/// Builds `per_problem` comparisons for each problem of `split`, rotating through the three
/// corruptions (a corrupted step falls back to a wrong answer when the solution has no
/// `a op b = c` lines). The completions are written in `template`'s format.
pub fn build_comparisons(split: &SplitProblems, template: Template, per_problem: usize, seed: u64) -> Vec<Comparison> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pairs = Vec::with_capacity(split.len() * per_problem);
    for (index, problem) in split.problems.iter().enumerate() {
        let chosen = template.response(problem);
        for k in 0..per_problem {
            let kind = [Corruption::CorruptedStep, Corruption::WrongAnswer, Corruption::BrokenFormat][(index + k) % 3];
            let spoiled = |answer: String, solution: String| Problem { answer, solution, ..problem.clone() };
            let (rejected, corruption) = match kind {
                Corruption::CorruptedStep => match corrupt_step(&problem.solution, &mut rng) {
                    Some((solution, answer, line)) if answer != problem.answer => {
                        let rejected = template.response(&spoiled(answer, solution.clone()));
                        let error = result_range(&rejected, &solution, line);
                        ((rejected, error), Corruption::CorruptedStep)
                    }
                    _ => (wrong_answer(template, problem, &mut rng), Corruption::WrongAnswer),
                },
                Corruption::WrongAnswer => (wrong_answer(template, problem, &mut rng), Corruption::WrongAnswer),
                _ => ((break_format(template, problem, &mut rng), None), Corruption::BrokenFormat),
            };
            let (rejected, rejected_error) = rejected;
            pairs.push(Comparison {
                prompt: problem.question.clone(),
                chosen: chosen.clone(),
                rejected,
                corruption,
                rejected_error,
            });
        }
    }
    pairs
}

/// A correct derivation with a wrong final answer, and the bytes of that answer (its last
/// occurrence: every template ends with the answer).
fn wrong_answer(template: Template, problem: &Problem, rng: &mut ChaCha8Rng) -> (String, Option<Range<usize>>) {
    let wrong = problem
        .answer
        .parse::<i64>()
        .map(|value| nearby(rng, value).to_string())
        .unwrap_or_else(|_| format!("{}1", problem.answer));
    let response = template.response(&Problem { answer: wrong.clone(), ..problem.clone() });
    let error = response.rfind(&wrong).map(|start| start..start + wrong.len());
    (response, error)
}

/// Pairs of a policy's own samples for one prompt: every (correct, incorrect) combination, up
/// to `max_pairs`.
pub fn policy_sample_pairs(
    prompt: &str,
    correct: &[String],
    incorrect: &[String],
    max_pairs: usize,
) -> Vec<Comparison> {
    correct
        .iter()
        .flat_map(|chosen| incorrect.iter().map(move |rejected| (chosen, rejected)))
        .take(max_pairs)
        .map(|(chosen, rejected)| Comparison {
            prompt: prompt.to_string(),
            chosen: chosen.clone(),
            rejected: rejected.clone(),
            corruption: Corruption::PolicySample,
            rejected_error: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasks::synthetic::{SyntheticConfig, generate};

    /// What the operands of a step line `a op b = c` give (the line's own `c` may be wrong).
    fn step_value(line: &str) -> i64 {
        let c = STEP.captures(line).unwrap_or_else(|| panic!("not a step: {line:?}"));
        let (a, b): (i64, i64) = (c[1].parse().unwrap(), c[3].parse().unwrap());
        match &c[2] {
            "+" => a + b,
            "-" => a - b,
            _ => a * b,
        }
    }

    #[test]
    fn a_corrupted_step_propagates_to_the_answer() {
        for seed in 0..20 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (solution, answer, line) = corrupt_step("3 + 4 = 7\n7 * 5 = 35\n35 - 2 = 33", &mut rng).unwrap();
            // Exactly one step is computed wrongly; the others are consistent with it.
            let mut wrong_steps = 0;
            let mut last = None;
            for line in solution.lines() {
                let r: i64 = STEP.captures(line).unwrap()[4].parse().unwrap();
                wrong_steps += usize::from(step_value(line) != r);
                last = Some(r);
            }
            assert_eq!(wrong_steps, 1, "{solution}");
            let corrupted = solution.lines().nth(line).unwrap();
            assert_ne!(
                step_value(corrupted).to_string(),
                &STEP.captures(corrupted).unwrap()[4],
                "line {line} is the wrong one: {solution}"
            );
            assert_eq!(answer, last.unwrap().to_string());
            assert_ne!(answer, "33", "{solution}");
        }
    }

    #[test]
    fn comparisons_cover_every_corruption_and_never_reject_the_truth() {
        let task = generate(&SyntheticConfig { train_size: 60, test_size: 30, seed: 2, ..SyntheticConfig::default() })
            .unwrap();
        let pairs = build_comparisons(&task.train, Template::XmlReasoning, 3, 0);
        assert_eq!(pairs.len(), 180);
        for kind in [Corruption::CorruptedStep, Corruption::WrongAnswer, Corruption::BrokenFormat] {
            assert!(pairs.iter().any(|p| p.corruption == kind), "{kind:?}");
        }
        for (pair, problem) in pairs.iter().zip(task.train.problems.iter().flat_map(|p| std::iter::repeat_n(p, 3))) {
            assert_ne!(pair.chosen, pair.rejected);
            let chosen = eval::score_completion(&pair.chosen, &problem.answer, Template::XmlReasoning.answer_format());
            let rejected =
                eval::score_completion(&pair.rejected, &problem.answer, Template::XmlReasoning.answer_format());
            assert!(chosen.strict && !rejected.strict, "{pair:?}");
        }
        assert_eq!(pairs, build_comparisons(&task.train, Template::XmlReasoning, 3, 0), "deterministic");
        // The recorded error is the wrong number: a step's wrong result (its line's operands
        // give another value), or the final answer.
        for template in [Template::Plain, Template::XmlReasoning] {
            for pair in build_comparisons(&task.train, template, 3, 1) {
                let Some(range) = pair.rejected_error.clone() else {
                    assert!(pair.corruption == Corruption::BrokenFormat, "{pair:?}");
                    continue;
                };
                let number: i64 = pair.rejected[range.clone()]
                    .parse()
                    .unwrap_or_else(|_| panic!("{:?} in {pair:?}", &pair.rejected[range.clone()]));
                let line = pair.rejected[..range.end].lines().last().unwrap();
                if pair.corruption == Corruption::CorruptedStep {
                    assert_ne!(step_value(line), number, "{pair:?}");
                } else {
                    assert!(
                        pair.rejected[range.end..].chars().all(|c| !c.is_ascii_digit()),
                        "the last number: {pair:?}"
                    );
                }
            }
        }
        // Held-out pairs come from the test split's questions only.
        let held_out = build_comparisons(&task.test, Template::XmlReasoning, 1, 0);
        let train_questions: std::collections::HashSet<_> = task.train.problems.iter().map(|p| &p.question).collect();
        assert!(held_out.iter().all(|p| !train_questions.contains(&p.prompt)));
    }
}
