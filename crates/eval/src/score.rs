//! Per-problem scores and accuracy with confidence intervals.

use serde::{Deserialize, Serialize};
use tasks::normalize_number;

use crate::extract::{self, AnswerFormat};
use crate::stats::wilson_interval;

/// How one completion did against one gold answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemScore {
    /// What strict extraction read (`None`: the format's answer was missing).
    pub strict_answer: Option<String>,
    /// What lenient extraction read.
    pub lenient_answer: Option<String>,
    /// Strict: the template's own answer format, compared as a string with the gold answer
    /// (the official GSM8K rule for `#### N`; the TRL demo's rule for `<answer>`).
    pub strict: bool,
    /// Lenient: the last number, normalised, equal to the normalised gold answer.
    pub lenient: bool,
}

/// Reads a gold answer given as a GSM8K solution ending in `#### N` or as a bare number, and
/// normalises it. `None` when it is neither.
pub fn parse_gold(text: &str) -> Option<String> {
    if text.contains("####") {
        extract::gsm8k_official(text).as_deref().and_then(normalize_number)
    } else {
        normalize_number(text)
    }
}

/// Scores `completion` against `gold` (already normalised, as in `tasks::Problem::answer`).
pub fn score_completion(completion: &str, gold: &str, format: AnswerFormat) -> ProblemScore {
    let strict_answer = extract::strict(completion, format);
    let lenient_answer = extract::lenient(completion, format);
    ProblemScore {
        strict: strict_answer.as_deref() == Some(gold),
        lenient: lenient_answer.is_some()
            && lenient_answer.as_deref().and_then(normalize_number).as_deref() == Some(gold),
        strict_answer,
        lenient_answer,
    }
}

/// An accuracy with its 95% Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Share of problems scored correct, in [0, 1].
    pub accuracy: f64,
    /// Lower bound of the 95% Wilson interval.
    pub ci_low: f64,
    /// Upper bound of the 95% Wilson interval.
    pub ci_high: f64,
    /// Number of problems.
    pub n: usize,
}

impl Accuracy {
    /// The accuracy of `correct` out of `n`, with its 95% Wilson interval. `n = 0` gives
    /// accuracy 0 with the uninformative interval [0, 1].
    pub fn from_counts(correct: usize, n: usize) -> Self {
        let (ci_low, ci_high) = wilson_interval(correct, n, 1.959_963_984_540_054);
        let accuracy = if n == 0 { 0.0 } else { correct as f64 / n as f64 };
        Self { accuracy, ci_low, ci_high, n }
    }
}

/// Strict and lenient accuracy over a set of problems.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AccuracySummary {
    /// Accuracy under the template's own answer format.
    pub strict: Accuracy,
    /// Accuracy under lenient (last-number) extraction.
    pub lenient: Accuracy,
}

impl AccuracySummary {
    /// Summarises per-problem scores.
    pub fn from_scores<'a>(scores: impl IntoIterator<Item = &'a ProblemScore>) -> Self {
        let (mut strict, mut lenient, mut n) = (0, 0, 0);
        for score in scores {
            n += 1;
            strict += usize::from(score.strict);
            lenient += usize::from(score.lenient);
        }
        Self { strict: Accuracy::from_counts(strict, n), lenient: Accuracy::from_counts(lenient, n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_answers_parse_from_solutions_and_bare_numbers() {
        assert_eq!(parse_gold("so it is 5\n#### 850,000").as_deref(), Some("850000"));
        assert_eq!(parse_gold("-3").as_deref(), Some("-3"));
        assert_eq!(parse_gold(" 1,200 ").as_deref(), Some("1200"));
        assert_eq!(parse_gold("no answer"), None);
    }

    #[test]
    fn strict_and_lenient_differ_where_they_should() {
        let marker = score_completion("5 + 3 = 8\n#### 8", "8", AnswerFormat::Gsm8kMarker);
        assert!(marker.strict && marker.lenient);
        let trailing_period = score_completion("#### 8.", "8", AnswerFormat::Gsm8kMarker);
        assert!(!trailing_period.strict && trailing_period.lenient);
        let no_marker = score_completion("The answer is $8.", "8", AnswerFormat::Gsm8kMarker);
        assert!(!no_marker.strict && no_marker.lenient);
        assert_eq!(no_marker.strict_answer, None);
        let tag = score_completion("<answer>\n-8\n</answer>", "-8", AnswerFormat::AnswerTag);
        assert!(tag.strict && tag.lenient);
        let wrong = score_completion("<answer>9</answer>", "8", AnswerFormat::AnswerTag);
        assert!(!wrong.strict && !wrong.lenient);
        let missing = score_completion("", "8", AnswerFormat::AnswerTag);
        assert!(!missing.strict && !missing.lenient);
    }

    #[test]
    fn accuracy_summary_counts() {
        let scores = [
            score_completion("#### 1", "1", AnswerFormat::Gsm8kMarker),
            score_completion("1", "1", AnswerFormat::Gsm8kMarker),
            score_completion("#### 2", "1", AnswerFormat::Gsm8kMarker),
            score_completion("#### 1", "1", AnswerFormat::Gsm8kMarker),
        ];
        let summary = AccuracySummary::from_scores(&scores);
        assert_eq!(summary.strict.n, 4);
        assert!((summary.strict.accuracy - 0.5).abs() < 1e-12);
        assert!((summary.lenient.accuracy - 0.75).abs() < 1e-12);
        assert!(summary.strict.ci_low < 0.5 && summary.strict.ci_high > 0.5);
    }
}
