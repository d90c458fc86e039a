//! GSM8K (Cobbe et al., 2021): 7,473 train and 1,319 test grade-school math word problems.
//!
//! Two file layouts are read:
//! - the original JSONL of openai/grade-school-math: one `{"question": ..., "answer": ...}` per
//!   line, where `answer` is a worked solution whose last line is `#### N`, with calculator
//!   annotations such as `<<48/2=24>>` inline;
//! - the hub's Parquet layout (`main/{train,test}-00000-of-00001.parquet` in the `openai/gsm8k`
//!   dataset repository), with string columns `question` and `answer` holding the same text.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::hub::{self, RepoType};
use crate::{Problem, Split, SplitProblems, TaskData, TaskError, normalize_number};

/// The hub dataset repository cotlab downloads GSM8K from by default.
pub const HUB_REPO: &str = "openai/gsm8k";

/// Where GSM8K comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Gsm8kSource {
    /// A directory holding `{split}.jsonl`, `{split}-00000-of-00001.parquet` or
    /// `main/{split}-00000-of-00001.parquet`. A single file is refused by [`load_split`]: it would
    /// be read as both splits, so the test problems would be trained on; use [`Gsm8kSource::Files`].
    Path(PathBuf),
    /// One local file per split (`.jsonl` or `.parquet`): `{ files = { train = ..., test = ... } }`.
    Files {
        /// The train split's file.
        train: PathBuf,
        /// The test split's file.
        test: PathBuf,
    },
    /// A dataset repository on the Hugging Face hub in the `openai/gsm8k` layout, fetched into the
    /// hub cache.
    Hub {
        /// Repository id, `openai/gsm8k` for the original.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
    },
}

impl Default for Gsm8kSource {
    fn default() -> Self {
        Gsm8kSource::Hub { repo: HUB_REPO.to_string(), revision: "main".to_string() }
    }
}

/// How GSM8K rows become [`Problem`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gsm8kOptions {
    /// Remove calculator annotations (`<<48/2=24>>`) from solutions. Default true: they are a
    /// tool-use convention of the original paper's calculator, and a policy fine-tuned or prompted
    /// with them learns to emit them.
    pub strip_calculator_annotations: bool,
}

impl Default for Gsm8kOptions {
    fn default() -> Self {
        Self { strip_calculator_annotations: true }
    }
}

static CALCULATOR_ANNOTATION: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"<<[^<>]*>>").expect("valid regex"));

/// Removes calculator annotations: `"48/2 = <<48/2=24>>24"` becomes `"48/2 = 24"`.
pub fn strip_calculator_annotations(text: &str) -> String {
    CALCULATOR_ANNOTATION.replace_all(text, "").into_owned()
}

/// Splits a GSM8K gold answer into the worked solution and the normalised final answer.
/// `origin` and `row` (1-based) name the row in errors.
pub fn parse_gold_answer(answer_field: &str, origin: &str, row: usize) -> Result<(String, String), TaskError> {
    let Some((solution, raw_answer)) = answer_field.rsplit_once("####") else {
        return Err(TaskError::MissingGoldAnswer { origin: origin.to_string(), row });
    };
    let raw_answer = raw_answer.trim();
    let answer = normalize_number(raw_answer).ok_or_else(|| TaskError::BadGoldAnswer {
        origin: origin.to_string(),
        row,
        raw: raw_answer.to_string(),
    })?;
    Ok((solution.trim_end().to_string(), answer))
}

fn make_problem(
    split: Split,
    index: usize,
    question: &str,
    answer_field: &str,
    origin: &str,
    options: Gsm8kOptions,
) -> Result<Problem, TaskError> {
    let (mut solution, answer) = parse_gold_answer(answer_field, origin, index + 1)?;
    if options.strip_calculator_annotations {
        solution = strip_calculator_annotations(&solution);
    }
    Ok(Problem { id: format!("gsm8k-{split}-{index}"), question: question.trim().to_string(), solution, answer })
}

#[derive(Deserialize)]
struct JsonRow {
    question: String,
    answer: String,
}

/// Reads a GSM8K JSONL file. Blank lines are skipped; a line that is not a JSON object with
/// string fields `question` and `answer` is an error naming the file and line.
pub fn read_jsonl(path: &Path, split: Split, options: Gsm8kOptions) -> Result<SplitProblems, TaskError> {
    let io_error = |source| TaskError::Io { path: path.to_path_buf(), source };
    let reader = BufReader::new(File::open(path).map_err(io_error)?);
    let origin = path.display().to_string();
    let mut problems = Vec::new();
    for (line_index, line) in reader.lines().enumerate() {
        let line = line.map_err(io_error)?;
        if line.trim().is_empty() {
            continue;
        }
        let row: JsonRow = serde_json::from_str(&line).map_err(|error| TaskError::BadJsonLine {
            path: path.to_path_buf(),
            line: line_index + 1,
            message: error.to_string(),
        })?;
        let problem =
            make_problem(split, problems.len(), &row.question, &row.answer, &origin, options).map_err(|error| {
                match error {
                    // Name the line of the file rather than the row index, which skips blank lines.
                    TaskError::MissingGoldAnswer { origin, .. } => {
                        TaskError::MissingGoldAnswer { origin, row: line_index + 1 }
                    }
                    TaskError::BadGoldAnswer { origin, raw, .. } => {
                        TaskError::BadGoldAnswer { origin, row: line_index + 1, raw }
                    }
                    other => other,
                }
            })?;
        problems.push(problem);
    }
    SplitProblems::new(split, problems, &origin)
}

/// Reads a GSM8K Parquet file in the hub's layout (string columns `question` and `answer`).
pub fn read_parquet(path: &Path, split: Split, options: Gsm8kOptions) -> Result<SplitProblems, TaskError> {
    let parquet_error = |message: String| TaskError::Parquet { path: path.to_path_buf(), message };
    let file = File::open(path).map_err(|source| TaskError::Io { path: path.to_path_buf(), source })?;
    let reader = SerializedFileReader::new(file).map_err(|error| parquet_error(error.to_string()))?;
    let origin = path.display().to_string();
    let mut problems = Vec::new();
    let rows = reader.get_row_iter(None).map_err(|error| parquet_error(error.to_string()))?;
    for (index, row) in rows.enumerate() {
        let row = row.map_err(|error| parquet_error(format!("row {}: {error}", index + 1)))?;
        let mut question = None;
        let mut answer = None;
        for (name, field) in row.get_column_iter() {
            let slot = match name.as_str() {
                "question" => &mut question,
                "answer" => &mut answer,
                _ => continue,
            };
            match field {
                Field::Str(text) => *slot = Some(text.clone()),
                other => {
                    return Err(parquet_error(format!(
                        "row {}: column `{name}` should be a string, found {other:?}",
                        index + 1
                    )));
                }
            }
        }
        let (Some(question), Some(answer)) = (question, answer) else {
            return Err(parquet_error(format!(
                "row {}: the columns `question` and `answer` are both required",
                index + 1
            )));
        };
        problems.push(make_problem(split, index, &question, &answer, &origin, options)?);
    }
    SplitProblems::new(split, problems, &origin)
}

/// The file of `split` in a local directory (see [`Gsm8kSource::Path`]), or `path` itself.
fn file_in(path: &Path, split: Split) -> Result<PathBuf, TaskError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let candidates = [
        path.join(format!("{split}.jsonl")),
        path.join(format!("{split}-00000-of-00001.parquet")),
        path.join("main").join(format!("{split}-00000-of-00001.parquet")),
    ];
    candidates
        .into_iter()
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| TaskError::SplitNotFound { path: path.to_path_buf(), split })
}

/// Reads one split from a local file or directory (see [`Gsm8kSource::Path`]).
pub fn read_path(path: &Path, split: Split, options: Gsm8kOptions) -> Result<SplitProblems, TaskError> {
    let file = file_in(path, split)?;
    match file.extension().and_then(|extension| extension.to_str()) {
        Some("parquet") => read_parquet(&file, split, options),
        _ => read_jsonl(&file, split, options),
    }
}

/// The one file `split` is read from: in a directory, named per split, or fetched from the hub
/// (into its cache, at the revision's commit: `.../snapshots/<commit>/...`). Study provenance
/// hashes it.
pub fn split_file(source: &Gsm8kSource, split: Split) -> Result<PathBuf, TaskError> {
    match source {
        Gsm8kSource::Path(path) if path.is_file() => Err(TaskError::OneFileForBothSplits { path: path.clone() }),
        Gsm8kSource::Path(path) => file_in(path, split),
        Gsm8kSource::Files { train, test } if train == test => {
            Err(TaskError::OneFileForBothSplits { path: train.clone() })
        }
        Gsm8kSource::Files { train, test } => Ok(match split {
            Split::Train => train.clone(),
            Split::Test => test.clone(),
        }),
        Gsm8kSource::Hub { repo, revision } => {
            let file = format!("main/{split}-00000-of-00001.parquet");
            hub::fetch(repo, RepoType::Dataset, revision, &file).map_err(|error| TaskError::Hub {
                repo: repo.clone(),
                file: file.clone(),
                message: error.to_string(),
            })
        }
    }
}

/// Loads one split of GSM8K from `source` (from [`split_file`]).
pub fn load_split(source: &Gsm8kSource, split: Split, options: Gsm8kOptions) -> Result<SplitProblems, TaskError> {
    read_path(&split_file(source, split)?, split, options)
}

/// Loads both splits of GSM8K from `source`.
pub fn load(source: &Gsm8kSource, options: Gsm8kOptions) -> Result<TaskData, TaskError> {
    Ok(TaskData {
        name: "gsm8k".to_string(),
        train: load_split(source, Split::Train, options)?,
        test: load_split(source, Split::Test, options)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_answer_is_split_and_normalised() {
        let (solution, answer) = parse_gold_answer("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024", "x", 1).unwrap();
        assert_eq!(solution, "She sold 48/2 = <<48/2=24>>24 clips.");
        assert_eq!(answer, "1024");
        assert_eq!(strip_calculator_annotations(&solution), "She sold 48/2 = 24 clips.");
        let (_, negative) = parse_gold_answer("It drops.\n#### -3", "x", 1).unwrap();
        assert_eq!(negative, "-3");
    }

    #[test]
    fn gold_answer_without_marker_names_the_row() {
        let error = parse_gold_answer("The answer is 4.", "test.jsonl", 12).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("test.jsonl") && message.contains("row 12"), "{message}");
        let error = parse_gold_answer("#### four", "test.jsonl", 3).unwrap_err();
        assert!(matches!(error, TaskError::BadGoldAnswer { row: 3, .. }));
    }
}
