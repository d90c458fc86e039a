//! Rule-based rewards: a batch of (prompt, completion, gold answer) gives one f32 per
//! completion. Reward functions do no I/O.
//!
//! - The TRL GRPO demo's five, as the demo defines them: correctness (2.0), integer answer
//!   (0.5), strict format (0.5), soft format (0.5) and XML tag count (up to 0.5).
//! - Minimal-GRPO's style: a format penalty (-0.25 when the `<think>...</think><answer>...
//!   </answer>` structure is missing) and correctness with partial credit for numeric closeness.
//! - Plain 1/0 correctness under strict or lenient extraction (`eval`'s extractors).
//! - DAPO's soft overlong punishment (Eq. 13 of arXiv 2503.14476, TRL's
//!   `get_soft_overlong_punishment`), over the completion's token count |y|:
//!   0 for |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache up to L_max, -1 beyond.
//!
//! Several functions combine with weights ([`WeightedRewards`]); each one's mean and standard
//! deviation are logged under `rewards/<name>/mean` and `rewards/<name>/std`.

use std::sync::LazyLock;

use eval::AnswerFormat;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// One completion to reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewardInput<'a> {
    /// The prompt text the completion continues.
    pub prompt: &'a str,
    /// The generated text.
    pub completion: &'a str,
    /// The gold answer, normalised (`tasks::Problem::answer`).
    pub answer: &'a str,
    /// Generated tokens of the completion (length rewards read it; text rewards ignore it).
    pub completion_tokens: usize,
}

/// A reward function.
pub trait RewardFunction: Send + Sync {
    /// The name under which its metrics are logged (`rewards/<name>/mean`).
    fn name(&self) -> &str;

    /// One reward per input, in order.
    fn score(&self, batch: &[RewardInput<'_>]) -> Vec<f32>;
}

/// The demo's `extract_xml_answer`: the text between the last `<answer>` and the following
/// `</answer>`, trimmed; the whole completion (trimmed) when there is no `<answer>` tag.
pub fn extract_xml_answer(text: &str) -> &str {
    let after = text.rsplit("<answer>").next().unwrap_or(text);
    after.split("</answer>").next().unwrap_or(after).trim()
}

// Python's `re.match` anchors at the start; its `$` also matches before a final newline,
// which `\n?\z` reproduces. Without DOTALL `.` stops at newlines, as in the demo.
static STRICT_FORMAT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\A<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n\n?\z").expect("valid regex")
});
static SOFT_FORMAT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)\A<reasoning>.*?</reasoning>\s*<answer>.*?</answer>").expect("valid regex"));
static THINK_FORMAT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\z").expect("valid regex"));

/// Number of non-overlapping occurrences, as Python's `str.count`.
fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// The demo's `count_xml`: 0.125 for each of the four tags placed once, minus 0.001 per
/// character after `</answer>`.
pub fn count_xml(text: &str) -> f32 {
    let mut total = 0.0f32;
    if count(text, "<reasoning>\n") == 1 {
        total += 0.125;
    }
    if count(text, "\n</reasoning>\n") == 1 {
        total += 0.125;
    }
    if count(text, "\n<answer>\n") == 1 {
        total += 0.125;
        let after = text.rsplit("\n</answer>\n").next().unwrap_or(text);
        total -= after.chars().count() as f32 * 0.001;
    }
    if count(text, "\n</answer>") == 1 {
        total += 0.125;
        let after = text.rsplit("\n</answer>").next().unwrap_or(text);
        total -= (after.chars().count() as f32 - 1.0) * 0.001;
    }
    total
}

/// Python's `str.isdigit` for ASCII text: non-empty and all digits.
fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_digit())
}

/// Which rule a reward function applies; the names are those of study files.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RewardKind {
    /// TRL demo: 2.0 when the `<answer>` text equals the gold answer.
    XmlCorrectness,
    /// TRL demo: 0.5 when the `<answer>` text is all digits.
    XmlInteger,
    /// TRL demo: 0.5 for `^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$`
    /// (`.` does not cross lines, so multi-line reasoning does not count, as in the demo).
    XmlStrictFormat,
    /// TRL demo: 0.5 for `<reasoning>.*?</reasoning>\s*<answer>.*?</answer>` at the start,
    /// matched across lines.
    XmlSoftFormat,
    /// TRL demo: `count_xml`, at most 0.5.
    XmlCount,
    /// Minimal-GRPO style: -0.25 unless the completion is `<think>...</think>` then
    /// `<answer>...</answer>`, 0 when it is.
    ThinkFormatPenalty,
    /// Minimal-GRPO style: 1 for the exact answer in `<answer>`, else partial credit
    /// 0.5 * max(0, 1 - |predicted - gold| / max(|gold|, 1)) for a number, 0 for none.
    NumericCloseness,
    /// 1 when the answer extracted with the template's strict rule equals the gold, else 0.
    StrictCorrect {
        /// The answer format strict extraction reads.
        format: AnswerFormat,
    },
    /// 1 when the last number (lenient extraction) equals the gold, else 0.
    LenientCorrect {
        /// The format whose answer region lenient extraction prefers.
        format: AnswerFormat,
    },
    /// DAPO's soft overlong punishment (TRL's `get_soft_overlong_punishment`, logged there as
    /// `soft_overlong_punishment_reward`): 0 up to `max_completion_len - soft_punish_cache`
    /// tokens, then falling linearly to -1 at `max_completion_len`, -1 beyond. Set
    /// `max_completion_len` to GRPO's `max_completion_length`.
    SoftOverlongPunishment {
        /// L_max.
        max_completion_len: usize,
        /// L_cache, the length of the linear ramp (0: none, a step after L_max).
        soft_punish_cache: usize,
    },
}

impl RewardKind {
    /// The metric name.
    pub fn name(self) -> &'static str {
        match self {
            RewardKind::XmlCorrectness => "xml_correctness",
            RewardKind::XmlInteger => "xml_integer",
            RewardKind::XmlStrictFormat => "xml_strict_format",
            RewardKind::XmlSoftFormat => "xml_soft_format",
            RewardKind::XmlCount => "xml_count",
            RewardKind::ThinkFormatPenalty => "think_format_penalty",
            RewardKind::NumericCloseness => "numeric_closeness",
            RewardKind::StrictCorrect { .. } => "strict_correct",
            RewardKind::LenientCorrect { .. } => "lenient_correct",
            RewardKind::SoftOverlongPunishment { .. } => "soft_overlong_punishment",
        }
    }

    /// The reward of one completion.
    pub fn reward(self, input: &RewardInput<'_>) -> f32 {
        let completion = input.completion;
        let flag = |hit: bool, value: f32| if hit { value } else { 0.0 };
        match self {
            RewardKind::XmlCorrectness => flag(extract_xml_answer(completion) == input.answer, 2.0),
            RewardKind::XmlInteger => flag(is_digits(extract_xml_answer(completion)), 0.5),
            RewardKind::XmlStrictFormat => flag(STRICT_FORMAT.is_match(completion), 0.5),
            RewardKind::XmlSoftFormat => flag(SOFT_FORMAT.is_match(completion), 0.5),
            RewardKind::XmlCount => count_xml(completion),
            RewardKind::ThinkFormatPenalty => flag(!THINK_FORMAT.is_match(completion), -0.25),
            RewardKind::NumericCloseness => numeric_closeness(completion, input.answer),
            RewardKind::StrictCorrect { format } => {
                flag(eval::score_completion(completion, input.answer, format).strict, 1.0)
            }
            RewardKind::LenientCorrect { format } => {
                flag(eval::score_completion(completion, input.answer, format).lenient, 1.0)
            }
            RewardKind::SoftOverlongPunishment { max_completion_len, soft_punish_cache } => {
                soft_overlong_punishment(input.completion_tokens, max_completion_len, soft_punish_cache)
            }
        }
    }

    /// Checks the parameters; the message names the field and the fix.
    pub fn validate(self) -> Result<(), String> {
        match self {
            RewardKind::SoftOverlongPunishment { max_completion_len, soft_punish_cache }
                if soft_punish_cache > max_completion_len =>
            {
                Err(format!(
                    "soft_overlong_punishment: soft_punish_cache = {soft_punish_cache} exceeds max_completion_len = {max_completion_len}; use a cache of at most max_completion_len (DAPO: 4096 of 20480)"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// DAPO's Eq. 13 for a completion of `length` tokens (see [`RewardKind::SoftOverlongPunishment`]).
pub fn soft_overlong_punishment(length: usize, max_completion_len: usize, soft_punish_cache: usize) -> f32 {
    let free = max_completion_len.saturating_sub(soft_punish_cache);
    if length <= free {
        0.0
    } else if length <= max_completion_len {
        (free as f32 - length as f32) / soft_punish_cache as f32
    } else {
        -1.0
    }
}

fn numeric_closeness(completion: &str, gold: &str) -> f32 {
    let Some(predicted) = eval::extract::answer_tag(completion) else {
        return 0.0;
    };
    if tasks::normalize_number(&predicted).as_deref() == Some(gold) {
        return 1.0;
    }
    let (Some(predicted), Ok(gold)) =
        (tasks::normalize_number(&predicted).and_then(|p| p.parse::<f64>().ok()), gold.parse::<f64>())
    else {
        return 0.0;
    };
    let relative_error = (predicted - gold).abs() / gold.abs().max(1.0);
    (0.5 * (1.0 - relative_error).max(0.0)) as f32
}

impl RewardFunction for RewardKind {
    fn name(&self) -> &str {
        RewardKind::name(*self)
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Vec<f32> {
        batch.iter().map(|input| self.reward(input)).collect()
    }
}

/// Reward functions with weights; the total is the weighted sum.
pub struct WeightedRewards {
    functions: Vec<(Box<dyn RewardFunction>, f32)>,
}

/// Rewards of a batch: the weighted total and each function's own (unweighted) values.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredBatch {
    /// Weighted sum per completion.
    pub total: Vec<f32>,
    /// (name, per-completion values) for each function, in order.
    pub per_function: Vec<(String, Vec<f32>)>,
}

impl WeightedRewards {
    /// Combines functions with weights.
    pub fn new(functions: Vec<(Box<dyn RewardFunction>, f32)>) -> Self {
        Self { functions }
    }

    /// Scores a batch.
    pub fn score(&self, batch: &[RewardInput<'_>]) -> ScoredBatch {
        let mut total = vec![0.0f32; batch.len()];
        let mut per_function = Vec::with_capacity(self.functions.len());
        for (function, weight) in &self.functions {
            let values = function.score(batch);
            assert_eq!(values.len(), batch.len(), "reward function {} returned the wrong count", function.name());
            for (sum, value) in total.iter_mut().zip(&values) {
                *sum += weight * value;
            }
            per_function.push((function.name().to_string(), values));
        }
        ScoredBatch { total, per_function }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(completion: &'a str, answer: &'a str) -> RewardInput<'a> {
        RewardInput { prompt: "", completion, answer, completion_tokens: 0 }
    }

    const PERFECT: &str = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n";

    #[test]
    fn the_demo_rewards_on_a_perfect_completion() {
        let perfect = input(PERFECT, "7");
        assert_eq!(RewardKind::XmlCorrectness.reward(&perfect), 2.0);
        assert_eq!(RewardKind::XmlInteger.reward(&perfect), 0.5);
        assert_eq!(RewardKind::XmlStrictFormat.reward(&perfect), 0.5);
        assert_eq!(RewardKind::XmlSoftFormat.reward(&perfect), 0.5);
        assert!((RewardKind::XmlCount.reward(&perfect) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn negative_answers_are_correct_but_not_integers() {
        let negative = input("<reasoning>\n2 - 5 = -3\n</reasoning>\n<answer>\n-3\n</answer>\n", "-3");
        assert_eq!(RewardKind::XmlCorrectness.reward(&negative), 2.0);
        assert_eq!(RewardKind::XmlInteger.reward(&negative), 0.0);
    }

    #[test]
    fn text_after_the_answer_costs_a_thousandth_per_character() {
        let trailing = format!("{PERFECT}extra");
        let reward = RewardKind::XmlCount.reward(&input(&trailing, "7"));
        // After "\n</answer>\n": "extra" (5 chars); after "\n</answer>": "\nextra" (6 - 1 = 5).
        assert!((reward - (0.5 - 0.010)).abs() < 1e-6, "{reward}");
        assert_eq!(RewardKind::XmlStrictFormat.reward(&input(&trailing, "7")), 0.0);
        assert_eq!(RewardKind::XmlSoftFormat.reward(&input(&trailing, "7")), 0.5);
    }

    #[test]
    fn missing_tags_and_multi_line_reasoning() {
        let bare = input("the answer is 7", "7");
        assert_eq!(RewardKind::XmlCorrectness.reward(&bare), 0.0);
        assert_eq!(RewardKind::XmlSoftFormat.reward(&bare), 0.0);
        assert_eq!(RewardKind::XmlCount.reward(&bare), 0.0);
        // Without an <answer> tag the demo compares the whole completion.
        assert_eq!(RewardKind::XmlCorrectness.reward(&input(" 7\n", "7")), 2.0);
        let multi_line = input("<reasoning>\n3 + 4 = 7\n7 * 2 = 14\n</reasoning>\n<answer>\n14\n</answer>\n", "14");
        // The demo's strict pattern does not let `.` cross lines: multi-line reasoning fails it.
        assert_eq!(RewardKind::XmlStrictFormat.reward(&multi_line), 0.0);
        assert_eq!(RewardKind::XmlSoftFormat.reward(&multi_line), 0.5);
        assert!((RewardKind::XmlCount.reward(&multi_line) - 0.5).abs() < 1e-6);
        // Python's `$` also accepts one more final newline.
        assert_eq!(RewardKind::XmlStrictFormat.reward(&input(&format!("{PERFECT}\n"), "7")), 0.5);
    }

    #[test]
    fn minimal_grpo_style_rewards() {
        let good = input("<think>\n3 + 4 = 7\n</think>\n<answer>7</answer>", "7");
        assert_eq!(RewardKind::ThinkFormatPenalty.reward(&good), 0.0);
        assert_eq!(RewardKind::NumericCloseness.reward(&good), 1.0);
        let close = input("<think>x</think><answer>90</answer>", "100");
        assert!((RewardKind::NumericCloseness.reward(&close) - 0.45).abs() < 1e-6);
        let unformatted = input("7", "7");
        assert_eq!(RewardKind::ThinkFormatPenalty.reward(&unformatted), -0.25);
        assert_eq!(RewardKind::NumericCloseness.reward(&unformatted), 0.0);
    }

    #[test]
    fn weighted_rewards_sum_and_keep_each_function() {
        let rewards = WeightedRewards::new(vec![
            (Box::new(RewardKind::XmlCorrectness), 1.0),
            (Box::new(RewardKind::LenientCorrect { format: AnswerFormat::AnswerTag }), 0.5),
        ]);
        let batch = [input(PERFECT, "7"), input("maybe 7", "7"), input("8", "7")];
        let scored = rewards.score(&batch);
        assert_eq!(scored.total, vec![2.5, 0.5, 0.0]);
        assert_eq!(scored.per_function[0].0, "xml_correctness");
        assert_eq!(scored.per_function[1].1, vec![1.0, 1.0, 0.0]);
    }
}
