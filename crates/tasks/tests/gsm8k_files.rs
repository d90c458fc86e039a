//! GSM8K parsing against the real files in `../shared/datasets/gsm8k/` (both layouts), and the
//! errors for bad input.

use std::io::Write;
use std::path::PathBuf;

use tasks::gsm8k::{self, Gsm8kOptions, Gsm8kSource};
use tasks::{Split, TaskError};

fn shared_gsm8k() -> PathBuf {
    let root = std::env::var_os("COTLAB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let dir = root.join("datasets/gsm8k");
    assert!(dir.is_dir(), "{} is missing: tests read the shared GSM8K copy there", dir.display());
    dir
}

#[test]
fn jsonl_and_parquet_give_the_same_problems_with_the_official_sizes() {
    let dir = shared_gsm8k();
    let options = Gsm8kOptions::default();
    for (split, rows) in [(Split::Train, 7473), (Split::Test, 1319)] {
        let jsonl = gsm8k::read_jsonl(&dir.join(format!("{split}.jsonl")), split, options).unwrap();
        let parquet =
            gsm8k::read_parquet(&dir.join(format!("{split}-00000-of-00001.parquet")), split, options).unwrap();
        assert_eq!(jsonl.len(), rows, "{split} rows in JSONL");
        assert_eq!(parquet.len(), rows, "{split} rows in Parquet");
        assert_eq!(jsonl, parquet, "{split}: both layouts hold the same problems");
    }
    // A directory source finds `{split}.jsonl` first.
    let data = gsm8k::load(&Gsm8kSource::Path(dir), options).unwrap();
    let first = &data.train.problems[0];
    assert_eq!(first.id, "gsm8k-train-0");
    assert!(first.question.starts_with("Natalia sold clips"), "{first:?}");
    assert_eq!(first.answer, "72");
    assert!(!first.solution.contains("<<") && !first.solution.contains("####"), "{first:?}");
    // Gold answers are integers, some negative, some written with thousands separators.
    let all = data.train.problems.iter().chain(&data.test.problems);
    assert!(all.clone().all(|p| p.answer.parse::<i64>().is_ok()));
    assert!(all.clone().any(|p| p.answer.starts_with('-')));
}

#[test]
fn calculator_annotations_are_kept_when_asked() {
    let dir = shared_gsm8k();
    let keep = Gsm8kOptions { strip_calculator_annotations: false };
    let test = gsm8k::read_path(&dir, Split::Test, keep).unwrap();
    assert!(test.problems.iter().any(|p| p.solution.contains("<<")));
}

fn temp_jsonl(lines: &[&str]) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
    file
}

#[test]
fn a_malformed_line_is_an_error_naming_file_and_line() {
    let file = temp_jsonl(&[
        r#"{"question": "1+1?", "answer": "1+1=2\n#### 2"}"#,
        "",
        "{\"question\": \"2+2?\", \"answer\": \"#### 4\"",
    ]);
    let error = gsm8k::read_jsonl(file.path(), Split::Train, Gsm8kOptions::default()).unwrap_err();
    assert!(matches!(error, TaskError::BadJsonLine { line: 3, .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&file.path().display().to_string()) && message.contains(":3:"), "{message}");
}

#[test]
fn a_gold_answer_without_marker_names_the_line() {
    let file = temp_jsonl(&[
        r#"{"question": "1+1?", "answer": "1+1=2\n#### 2"}"#,
        r#"{"question": "2+2?", "answer": "2+2=4"}"#,
    ]);
    let error = gsm8k::read_jsonl(file.path(), Split::Train, Gsm8kOptions::default()).unwrap_err();
    assert!(matches!(error, TaskError::MissingGoldAnswer { row: 2, .. }), "{error}");
}

#[test]
fn an_empty_split_is_an_error() {
    let file = temp_jsonl(&[""]);
    let error = gsm8k::read_jsonl(file.path(), Split::Test, Gsm8kOptions::default()).unwrap_err();
    assert!(matches!(error, TaskError::EmptySplit { split: Split::Test, .. }), "{error}");
}

#[test]
fn a_directory_without_the_split_says_what_it_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let error = gsm8k::read_path(dir.path(), Split::Train, Gsm8kOptions::default()).unwrap_err();
    assert!(error.to_string().contains("train.jsonl"), "{error}");
}

#[test]
fn a_corrupt_parquet_file_is_an_error_naming_it() {
    let mut file = tempfile::Builder::new().suffix(".parquet").tempfile().unwrap();
    file.write_all(b"PAR1 this is not parquet").unwrap();
    let error = gsm8k::read_path(file.path(), Split::Train, Gsm8kOptions::default()).unwrap_err();
    assert!(matches!(error, TaskError::Parquet { .. }), "{error}");
}

/// One file named as the source used to be read for both splits, so the study trained on its
/// test problems; now each split names its own file.
#[test]
fn one_file_is_not_both_splits_and_files_name_each_split() {
    let train = temp_jsonl(&[
        r#"{"question": "1+1?", "answer": "1+1=2\n#### 2"}"#,
        "{\"question\": \"2+3?\", \"answer\": \"#### 5\"}",
    ]);
    let test = temp_jsonl(&["{\"question\": \"4+4?\", \"answer\": \"#### 8\"}"]);
    let error = gsm8k::load(&Gsm8kSource::Path(train.path().to_path_buf()), Gsm8kOptions::default()).unwrap_err();
    assert!(matches!(error, TaskError::OneFileForBothSplits { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&train.path().display().to_string()) && message.contains("files = { train ="),
        "{message}"
    );
    let same = Gsm8kSource::Files { train: train.path().to_path_buf(), test: train.path().to_path_buf() };
    assert!(matches!(gsm8k::load(&same, Gsm8kOptions::default()), Err(TaskError::OneFileForBothSplits { .. })));
    // The study file's spelling, `{ files = { train = ..., test = ... } }`.
    let source: Gsm8kSource =
        serde_json::from_value(serde_json::json!({ "files": { "train": train.path(), "test": test.path() } })).unwrap();
    let data = gsm8k::load(&source, Gsm8kOptions::default()).unwrap();
    assert_eq!((data.train.len(), data.test.len()), (2, 1));
    assert_eq!(data.test.problems[0].answer, "8");
    assert_eq!(data.train.problems[1].id, "gsm8k-train-1");
}
