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

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crates/policy-models/tests/fixtures").join(name)
}

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap()).unwrap()
}

#[test]
fn logits_of_a_tiny_checkpoint_match_transformers() {
    let reference = reference("llama3");
    let ids: Vec<String> = reference["input_ids"][0].as_array().unwrap().iter().map(|id| id.to_string()).collect();
    let out = tempfile::tempdir().unwrap();
    let out_file = out.path().join("logits.json");
    let output = xtask(&[
        "logits",
        "--model",
        fixture_dir("llama3").to_str().unwrap(),
        "--ids",
        &ids.join(","),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_file).unwrap()).unwrap();
    let ours = ours["logits"].as_array().unwrap();
    let expected = reference["logits"][0].as_array().unwrap();
    assert_eq!(ours.len(), expected.len());
    for (row, expected_row) in ours.iter().zip(expected) {
        for (value, expected_value) in row.as_array().unwrap().iter().zip(expected_row.as_array().unwrap()) {
            assert!((value.as_f64().unwrap() - expected_value.as_f64().unwrap()).abs() < 1e-4);
        }
    }
}

#[test]
fn generate_greedy_json_matches_transformers() {
    let reference = reference("gpt_neo");
    let ids: Vec<String> = reference["input_ids"][0].as_array().unwrap().iter().map(|id| id.to_string()).collect();
    let output = xtask(&[
        "generate",
        "--model",
        fixture_dir("gpt_neo").to_str().unwrap(),
        "--ids",
        &ids.join(","),
        "--max-new-tokens",
        "8",
        "--greedy",
        "--json",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["completion_ids"], reference["greedy_new_tokens"][0]);
    assert!(json["text"].is_null(), "the tiny checkpoint has no tokenizer");
    // A missing checkpoint offline is a clear error.
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["generate", "--model", "nobody/no-such-model", "--ids", "1", "--json"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nobody/no-such-model") && stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
}

/// The shared SmolLM2 GGUF as a user passes it, converted into a fresh cache: `generate --chat`
/// renders the question with the file's chat template and gives transformers' greedy tokens
/// (`tools/parity/make_gguf_fixtures.py`).
#[test]
fn generate_chat_on_the_shared_gguf_matches_transformers() {
    let shared = shared_gsm8k().join("../..");
    let gguf = shared.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crates/policy-models/tests/fixtures/gguf/smollm2.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["generate", "--model", gguf.to_str().unwrap(), "--chat", "--prompt"])
        .arg(reference["chat"][0]["question"].as_str().unwrap())
        .args(["--max-new-tokens", "16", "--greedy", "--json"])
        .env("COTLAB_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["completion_ids"], reference["greedy"]);
    assert!(json["text"].as_str().is_some_and(|text| !text.is_empty()));
}

#[test]
fn bench_smoke_run_reports_every_key() {
    // A debug-build smoke run: the numbers mean nothing here, the keys and shapes do.
    let output = xtask(&["bench", "--allow-debug", "--no-torch", "--train-steps", "1", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["train_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["gen_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["torch_train_tokens_per_s"].is_null() && report["torch_gen_tokens_per_s"].is_null());
    for key in [
        "hidden_size",
        "num_layers",
        "num_heads",
        "vocab_size",
        "batch_size",
        "seq_len",
        "gen_batch_size",
        "prompt_len",
        "new_tokens",
    ] {
        assert!(report["config"][key].as_u64().unwrap() > 0, "config.{key}");
    }
}

#[test]
fn logits_of_a_reward_model_is_its_score() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crates/reward-model/tests/fixtures/roberta_regressor");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ids: Vec<String> = reference["input_ids"][0].as_array().unwrap().iter().map(|id| id.to_string()).collect();
    let output = xtask(&["logits", "--model", dir.to_str().unwrap(), "--ids", &ids.join(",")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let score = json["logits"][0][0].as_f64().unwrap();
    assert!((score - reference["scores"][0].as_f64().unwrap()).abs() < 1e-4, "{json}");
}

#[test]
fn reward_model_smoke_run_reports_held_out_accuracy_and_saves() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("rm");
    let output = xtask(&[
        "reward-model",
        "--steps",
        "2",
        "--train-size",
        "60",
        "--test-size",
        "10",
        "--hidden-size",
        "32",
        "--intermediate-size",
        "48",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("held-out pairwise accuracy") && text.contains("over 10 pairs"), "{text}");
    assert!(
        dir.join("model.safetensors").is_file()
            && dir.join("config.json").is_file()
            && dir.join("tokenizer.json").is_file()
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["hidden_size"].as_u64(), config["intermediate_size"].as_u64()),
        (Some(32), Some(48)),
        "{config}"
    );
    let bad = xtask(&["reward-model", "--steps", "1", "--hidden-size", "30"]);
    let error = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && error.contains("--hidden-size 30"), "{error}");
}

#[test]
fn dry_run_prints_the_matrix_and_a_cost_estimate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output =
        Command::new(env!("CARGO_BIN_EXE_xtask")).args(["compare", "--dry-run"]).current_dir(&root).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("grpo__rules__seed0") && text.contains("ppo__rules__seed2"), "{text}");
    assert!(text.contains("generated") && text.contains("time: at most ~"), "{text}");
}

#[test]
fn plot_without_a_study_says_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["plot", "reports/missing"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("reports/missing/summary.json") && error.contains("cargo xtask compare"), "{error}");
}

/// `generate --ids` runs without a tokenizer only when the checkpoint has none: one that is
/// present but unreadable used to be dropped silently, and its EOS ids with it.
#[test]
fn generate_refuses_a_broken_tokenizer_and_a_missing_path() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir("gpt_neo")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let output = xtask(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--ids",
        "1,2",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
    // A mistyped directory is a path that does not exist, not a hub id to download.
    let missing = dir.path().join("no-such-checkpoint");
    let output = xtask(&["generate", "--model", missing.to_str().unwrap(), "--ids", "1", "--json"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("read as a path") && stderr.contains("does not exist"), "{stderr}");
}
