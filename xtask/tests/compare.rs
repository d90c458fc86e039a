//! The quick preset of the default study, end to end, in a scratch directory: the files and
//! their contents, and that a rerun skips finished cells.

use std::process::Command;

#[test]
fn quick_study_writes_its_reports_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("configs")).unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml");
    std::fs::copy(config, dir.path().join("configs/default.toml")).unwrap();
    let run = || Command::new(env!("CARGO_BIN_EXE_xtask")).args(["compare", "--preset", "quick", "--quiet"]).current_dir(dir.path()).output().unwrap();
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let reports = dir.path().join("reports/default-quick");
    for file in ["config.json", "summary.csv", "summary.json", "report.md", "base/model.safetensors", "base/tokenizer.json"] {
        assert!(reports.join(file).is_file(), "{file} missing");
    }
    let summaries: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(reports.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summaries.len(), 6, "method x reward source x seed cells of the quick default study");
    for summary in &summaries {
        for key in ["method", "reward_source", "seed", "accuracy_strict", "accuracy_lenient", "accuracy_lenient_ci_low", "accuracy_lenient_ci_high", "train_seconds"] {
            assert!(summary.get(key).is_some(), "{key} missing in {summary}");
        }
    }
    let grpo = summaries.iter().find(|s| s["method"] == "grpo").unwrap();
    assert!(grpo["error"].is_null(), "{grpo}");
    assert!(grpo["accuracy_lenient_ci_high"].as_f64().unwrap() > 0.0);
    let metrics = std::fs::read_to_string(reports.join("cells/grpo__rules__seed0/metrics.csv")).unwrap();
    let header = metrics.lines().next().unwrap();
    for column in ["step", "reward", "kl", "update_norm", "rewards/strict_correct/mean"] {
        assert!(header.split(',').any(|c| c == column), "metrics.csv lacks {column}: {header}");
    }
    assert_eq!(metrics.lines().count(), 1 + 3, "a row per step");
    let csv_header = std::fs::read_to_string(reports.join("summary.csv")).unwrap().lines().next().unwrap().to_string();
    assert!(csv_header.starts_with("method,reward_source,seed,accuracy_strict"), "{csv_header}");
    // A rerun skips the finished cells (and retries the one whose reward model is missing).
    let second = run();
    assert!(second.status.success());
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(log.contains("grpo__rules__seed0: done earlier, skipped"), "{log}");
    assert!(log.contains("base policy: ") && log.contains("trained earlier"), "{log}");
}
