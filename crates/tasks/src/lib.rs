//! Problem sources for cotlab.
//!
//! A *task* is a set of math word problems with worked chain-of-thought solutions and integer
//! answers, in named splits. Two sources exist:
//!
//! - [`gsm8k`]: Grade School Math 8K, from its original JSONL files, the hub's Parquet layout, or
//!   the `openai/gsm8k` dataset repository on the Hugging Face hub (downloaded and cached).
//! - [`synthetic`]: random arithmetic expressions over `+`, `-`, `*` and parentheses, with a worked
//!   solution of one line per operation; deterministic for a seed.
//!
//! Architecture invariant: this crate does no tensor work and knows nothing about models or
//! prompts. It only produces [`Problem`]s.

pub mod gsm8k;
pub mod hub;
pub mod synthetic;

mod error;

pub use error::TaskError;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One math problem with its worked solution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Stable identifier, unique within a task (for example `gsm8k-test-17` or
    /// `synthetic-train-3`).
    pub id: String,
    /// The question as posed to the model.
    pub question: String,
    /// The worked chain of thought, without the final-answer line (GSM8K's `#### N`).
    pub solution: String,
    /// The final answer, normalised: an integer written without thousands separators
    /// (`"-3"`, `"850000"`).
    pub answer: String,
}

/// A named split of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Problems that training, few-shot exemplars and reward-model comparisons may use.
    Train,
    /// Held-out problems: evaluation only.
    Test,
}

impl Split {
    /// Both splits, train first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];

    /// The split's name as used in file names (`train`, `test`).
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = TaskError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            other => Err(TaskError::UnknownSplit { name: other.to_string() }),
        }
    }
}

/// The problems of one split, tagged with the split they came from so that code which must
/// never see test problems (few-shot exemplars, training) can check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitProblems {
    /// Which split these problems are.
    pub split: Split,
    /// The problems, in source order.
    pub problems: Vec<Problem>,
}

impl SplitProblems {
    /// Wraps problems of a split; an empty split is an error naming `origin` (a file or a task).
    pub fn new(split: Split, problems: Vec<Problem>, origin: &str) -> Result<Self, TaskError> {
        if problems.is_empty() {
            return Err(TaskError::EmptySplit { split, origin: origin.to_string() });
        }
        Ok(Self { split, problems })
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// Always false: an empty split cannot be built.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A task with both splits loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskData {
    /// Human-readable name (`gsm8k`, `synthetic-arithmetic`).
    pub name: String,
    /// Training problems.
    pub train: SplitProblems,
    /// Held-out problems.
    pub test: SplitProblems,
}

impl TaskData {
    /// The problems of one split.
    pub fn split(&self, split: Split) -> &SplitProblems {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }
}

/// Normalises a numeric answer the way the official GSM8K scorer compares them: thousands
/// separators removed; also a leading `$`, surrounding whitespace and a trailing `.` or `.0`
/// (`"$1,200.00"` gives `"1200"`). Returns `None` when nothing numeric is left.
pub fn normalize_number(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    // "$-5" and "-$5" both mean minus five dollars.
    let (negative, unsigned) = match trimmed.trim_start_matches('$').strip_prefix('-') {
        Some(rest) => (true, rest.trim_start_matches('$')),
        None => (false, trimmed.trim_start_matches('$')),
    };
    let mut text: String = unsigned.chars().filter(|c| *c != ',').collect();
    if negative {
        text.insert(0, '-');
    }
    while text.ends_with('.') {
        text.pop();
    }
    if text.contains('.') {
        // "12.50" -> "12.5", "12.00" -> "12": trailing zeros after the point carry no value.
        text = text.trim_end_matches('0').trim_end_matches('.').to_string();
        if text.is_empty() || text == "-" {
            text = "0".to_string();
        }
    }
    let body = text.strip_prefix('-').unwrap_or(&text);
    let digits_ok = !body.is_empty()
        && body.chars().all(|c| c.is_ascii_digit() || c == '.')
        && body.chars().filter(|c| *c == '.').count() <= 1
        && body.chars().any(|c| c.is_ascii_digit());
    if !digits_ok {
        return None;
    }
    // A leading "." gets its zero back and "-0" is "0", so equal numbers give equal strings.
    let mut normal = if body.starts_with('.') { format!("0{body}") } else { body.to_string() };
    let trimmed_leading = normal.trim_start_matches('0');
    normal = if trimmed_leading.is_empty() || trimmed_leading.starts_with('.') {
        format!("0{trimmed_leading}")
    } else {
        trimmed_leading.to_string()
    };
    if text.starts_with('-') && normal != "0" {
        normal.insert(0, '-');
    }
    Some(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_number_handles_currency_separators_and_decimals() {
        assert_eq!(normalize_number("$1,200.00").as_deref(), Some("1200"));
        assert_eq!(normalize_number("850,000").as_deref(), Some("850000"));
        assert_eq!(normalize_number("-3").as_deref(), Some("-3"));
        assert_eq!(normalize_number("12.50").as_deref(), Some("12.5"));
        assert_eq!(normalize_number("18.").as_deref(), Some("18"));
        assert_eq!(normalize_number("007").as_deref(), Some("7"));
        assert_eq!(normalize_number("-0").as_deref(), Some("0"));
        assert_eq!(normalize_number("-$4").as_deref(), Some("-4"));
        assert_eq!(normalize_number("$-4.50").as_deref(), Some("-4.5"));
        assert_eq!(normalize_number(".5").as_deref(), Some("0.5"));
        assert_eq!(normalize_number(".0").as_deref(), Some("0"));
        assert_eq!(normalize_number("100").as_deref(), Some("100"));
        assert_eq!(normalize_number("abc"), None);
        assert_eq!(normalize_number(""), None);
        assert_eq!(normalize_number("1.2.3"), None);
        assert_eq!(normalize_number("-"), None);
    }

    #[test]
    fn split_names_round_trip() {
        for split in Split::ALL {
            assert_eq!(split.name().parse::<Split>().unwrap(), split);
        }
        assert!(matches!("valid".parse::<Split>(), Err(TaskError::UnknownSplit { .. })));
    }

    #[test]
    fn empty_split_is_an_error_naming_its_origin() {
        let err = SplitProblems::new(Split::Test, vec![], "data/test.jsonl").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("data/test.jsonl") && message.contains("test"), "{message}");
    }
}
