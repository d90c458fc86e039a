//! An RL cell killed mid-run (SIGKILL, which nothing can handle, and Ctrl-C's SIGINT) and rerun
//! resumes from its last checkpoint and ends with the metrics, summary and samples of an
//! uninterrupted run. One scratch directory for the three runs: the base is trained once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A tiny study: a 30-step base, one GRPO cell of 8 steps with a checkpoint every 2 and a
/// held-out evaluation every 3 (so a resumed cell also has evaluation rows to carry).
const STUDY: &str = r#"
name = "resume"
seeds = [0]
checkpoint_every = 2

[task]
kind = "synthetic"
[task.synthetic]
operators = ["add", "sub"]
min_operand = 1
max_operand = 9
min_operations = 1
max_operations = 2
max_depth = 2
train_size = 300
test_size = 40
seed = 0

[policy]
template = "plain"
max_length = 128
[policy.base]
kind = "preset"
preset = "tiny_gpt_neo"
vocab_size = 384
[policy.base.sft]
steps = 30
batch_size = 8
learning_rate = 3e-3
data_fraction = 0.5
problems_per_document = 5
answer_marker_fraction = 0.3

[reward_sources.rules]
rules = [
  { kind = "strict_correct", format = "gsm8k_marker", weight = 1.0 },
  { kind = "lenient_correct", format = "gsm8k_marker", weight = 1.0 },
]

[methods.grpo]
kind = "rl"
algorithm = "grpo"
reward_sources = ["rules"]
steps = 8
prompts_per_step = 2
optim = { learning_rate = 1e-4, max_grad_norm = 1.0 }
config = { num_generations = 4, max_completion_length = 16, beta = 0.04, temperature = 0.7 }

[evaluation]
test_size = 8
max_new_tokens = 16
batch_size = 8
eval_every = 3
train_eval_size = 4
samples = 2
"#;

/// Columns of metrics.csv that measure time, not the training.
const TIMING_COLUMNS: [&str; 3] = ["step_time", "update_time", "tokens_per_second"];

fn start(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["compare", "configs/resume.toml", "--quiet"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (Output, String) {
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    (output, stderr)
}

/// What a cell's run produced, less its timings: metrics.csv without the timing columns,
/// summary.json without `train_seconds`, samples.jsonl, and a hash of a LoRA cell's adapters.
#[derive(Debug, PartialEq)]
struct Results {
    metrics: Vec<Vec<String>>,
    summary: serde_json::Value,
    samples: String,
    adapters: Option<u64>,
}

fn results(cell_dir: &Path) -> Results {
    let mut reader = csv::Reader::from_path(cell_dir.join("metrics.csv")).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_string).collect();
    let keep: Vec<usize> = (0..header.len()).filter(|&i| !TIMING_COLUMNS.contains(&header[i].as_str())).collect();
    let mut metrics = vec![keep.iter().map(|&i| header[i].clone()).collect::<Vec<_>>()];
    metrics.extend(reader.records().map(|record| {
        let record = record.unwrap();
        keep.iter().map(|&i| record[i].to_string()).collect()
    }));
    let mut summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cell_dir.join("summary.json")).unwrap()).unwrap();
    assert!(summary.as_object_mut().unwrap().remove("train_seconds").is_some());
    let adapters = std::fs::read(cell_dir.join("adapter/adapter_model.safetensors")).ok().map(|bytes| {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut hasher);
        hasher.finish()
    });
    Results { metrics, summary, samples: std::fs::read_to_string(cell_dir.join("samples.jsonl")).unwrap(), adapters }
}

/// The step of the cell's checkpoint, if it has a complete one.
fn checkpoint_step(cell_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(cell_dir.join("checkpoint/runner.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

/// The last step with a row in metrics.csv.
fn last_metrics_step(cell_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(cell_dir.join("metrics.csv")).ok()?;
    text.lines().skip(1).filter_map(|line| line.split(',').nth(3)?.parse().ok()).max()
}

/// Starts the study and returns once the cell has a checkpoint at step 2 or later and a row
/// past it in metrics.csv: a kill now lands after a checkpoint, with rows the resumed run must
/// drop or rewrite.
fn start_and_wait_for_checkpoint(dir: &Path, cell_dir: &Path) -> Child {
    let mut child = start(dir);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let (Some(checkpoint), Some(last)) = (checkpoint_step(cell_dir), last_metrics_step(cell_dir))
            && checkpoint >= 2
            && last > checkpoint
        {
            return child;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let (_, stderr) = finish(child);
            panic!("the run ended ({status}) before a checkpoint was seen: {stderr}");
        }
        assert!(Instant::now() < deadline, "no checkpoint in {}", cell_dir.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rerun_and_compare(dir: &Path, cell: &str, cell_dir: &Path, from_step: u64, reference: &Results) {
    let (output, stderr) = finish(start(dir));
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("resuming {cell} from step {from_step}\n")), "{stderr}");
    assert!(stderr.contains("(trained earlier)"), "the base is reused: {stderr}");
    assert_eq!(&results(cell_dir), reference, "the resumed cell differs from the uninterrupted one");
    assert!(!cell_dir.join("checkpoint").exists(), "a finished cell keeps no checkpoint");
}

#[test]
fn a_killed_or_interrupted_grpo_cell_resumes_to_the_uninterrupted_results() {
    check_resume(STUDY, "grpo__rules__seed0", false);
}

/// PPO (its value head and optimizer moments in the checkpoint) under LoRA (the adapters
/// resumed onto the frozen base).
#[test]
fn a_killed_or_interrupted_lora_ppo_cell_resumes_to_the_uninterrupted_results() {
    let study = STUDY.replacen("[policy]\n", "[policy]\nlora = { rank = 2, alpha = 4.0 }\n", 1).replacen(
        "[methods.grpo]\nkind = \"rl\"\nalgorithm = \"grpo\"",
        "[methods.ppo]\nkind = \"rl\"\nalgorithm = \"ppo\"",
        1,
    );
    let study = study.replacen(
        "config = { num_generations = 4, max_completion_length = 16, beta = 0.04, temperature = 0.7 }",
        "config = { max_completion_length = 16, num_ppo_epochs = 2, num_mini_batches = 2, temperature = 0.7 }",
        1,
    );
    assert!(
        study.contains("lora = {") && study.contains("algorithm = \"ppo\"") && study.contains("num_ppo_epochs"),
        "{study}"
    );
    check_resume(&study, "ppo__rules__seed0", true);
}

/// (a) an uninterrupted run of `study`; (b) a run killed with SIGKILL after a checkpoint, then
/// rerun; (c) a run stopped by SIGINT, then rerun: (b) and (c) end with (a)'s results.
fn check_resume(study: &str, cell: &str, lora: bool) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("configs")).unwrap();
    std::fs::write(dir.path().join("configs/resume.toml"), study).unwrap();
    let cell_dir: PathBuf = dir.path().join("reports/resume/cells").join(cell);

    // (a) Uninterrupted.
    let (output, stderr) = finish(start(dir.path()));
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("resuming"), "{stderr}");
    let reference = results(&cell_dir);
    assert_eq!(reference.metrics.len(), 1 + 1 + 8, "header, step 0, 8 steps: {:?}", reference.metrics);
    assert_eq!(reference.summary["status"], "finished", "{}", reference.summary);
    assert!(reference.summary["final_reward"].is_number(), "{}", reference.summary);
    assert!(!cell_dir.join("checkpoint").exists(), "a finished cell keeps no checkpoint");
    assert_eq!(reference.adapters.is_some(), lora, "a LoRA cell keeps its adapters");

    // (b) SIGKILL after a checkpoint, mid-step: the rerun resumes from the checkpoint.
    std::fs::remove_dir_all(&cell_dir).unwrap();
    let mut child = start_and_wait_for_checkpoint(dir.path(), &cell_dir);
    child.kill().unwrap();
    let (output, _) = finish(child);
    assert!(!output.status.success());
    assert!(!cell_dir.join("summary.json").exists(), "a killed cell has no summary");
    // The kill may land inside a checkpoint's swap: the rerun recovers the complete one.
    let killed_at = checkpoint_step(&cell_dir).or_else(|| {
        let text = std::fs::read_to_string(cell_dir.join("checkpoint.old/runner.json")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
    });
    let killed_at = killed_at.expect("a complete checkpoint survives the kill");
    assert!((2..8).contains(&killed_at), "{killed_at}");
    rerun_and_compare(dir.path(), cell, &cell_dir, killed_at, &reference);

    // (c) Ctrl-C: the step ends, a checkpoint is written, compare exits non-zero and says how
    // to resume; no result is written.
    std::fs::remove_dir_all(&cell_dir).unwrap();
    let child = start_and_wait_for_checkpoint(dir.path(), &cell_dir);
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let (output, stderr) = finish(child);
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(output.status.code(), Some(1), "an error exit, not death by the signal: {stderr}");
    let interrupted_at = checkpoint_step(&cell_dir).expect("Ctrl-C writes a checkpoint");
    assert!(
        stderr.contains(&format!("interrupted at step {interrupted_at} of {cell}; rerun the same command to resume")),
        "{stderr}"
    );
    assert_eq!(last_metrics_step(&cell_dir), Some(interrupted_at), "the checkpoint holds every step run: {stderr}");
    assert!(
        !cell_dir.join("summary.json").exists() && !cell_dir.join("samples.jsonl").exists(),
        "an interrupted cell writes no result"
    );
    rerun_and_compare(dir.path(), cell, &cell_dir, interrupted_at, &reference);
}
