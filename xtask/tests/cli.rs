//! Smoke tests of the `cargo xtask` entry points, run as a user runs them.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().expect("xtask runs")
}

fn shared_gsm8k() -> PathBuf {
    let root = std::env::var_os("COTLAB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    root.join("datasets/gsm8k")
}

#[test]
fn help_lists_the_subcommands() {
    let output = xtask(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for subcommand in ["compare", "plot", "score"] {
        assert!(help.contains(subcommand), "{help}");
    }
}

/// Writes `{"completion", "answer"}` lines for one model of the example solutions.
fn example_predictions(model: &str) -> tempfile::NamedTempFile {
    let dir = shared_gsm8k();
    let solutions = std::fs::read_to_string(dir.join("example_model_solutions.jsonl")).unwrap();
    let gold = std::fs::read_to_string(dir.join("test.jsonl")).unwrap();
    let mut file = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
    for (solution_line, gold_line) in solutions.lines().zip(gold.lines()) {
        let row: serde_json::Value = serde_json::from_str(solution_line).unwrap();
        let gold: serde_json::Value = serde_json::from_str(gold_line).unwrap();
        let line = serde_json::json!({"completion": row[model]["solution"], "answer": gold["answer"]});
        writeln!(file, "{line}").unwrap();
    }
    file
}

#[test]
fn score_json_on_real_solutions_matches_the_labels() {
    // Labelled accuracy of the 175B verifier model's solutions: 56.25% (shared README).
    let predictions = example_predictions("175b_verification");
    let output = xtask(&["score", predictions.path().to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let lenient = &report["lenient"];
    assert_eq!(lenient["n"], 1319);
    let accuracy = lenient["accuracy"].as_f64().unwrap() * 100.0;
    assert!((accuracy - 56.25).abs() <= 0.5, "lenient {accuracy}");
    assert!(lenient["ci_low"].as_f64().unwrap() < lenient["accuracy"].as_f64().unwrap());
    // The solutions end with `A: N`, never `#### N`: strict GSM8K scoring finds no answer.
    assert_eq!(report["strict"]["accuracy"].as_f64().unwrap(), 0.0);
    // The table form prints both rows.
    let table = xtask(&["score", predictions.path().to_str().unwrap()]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.contains("strict") && text.contains("lenient") && text.contains("1319"), "{text}");
}

#[test]
fn score_names_the_bad_line() {
    let mut file = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
    writeln!(file, "{}", serde_json::json!({"completion": "#### 3", "answer": 3})).unwrap();
    writeln!(file, "{{\"completion\": \"#### 3\"").unwrap();
    let output = xtask(&["score", file.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&format!("{}:2", file.path().display())), "{stderr}");
}
