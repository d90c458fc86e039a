//! The quick preset of the default study, end to end, in a scratch directory: compare then plot,
//! the files and their contents (CSV columns, JSON fields, PNG decodes, SVG parses), and that a
//! rerun skips finished cells.

use std::process::Command;

#[test]
fn quick_study_writes_its_reports_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("configs")).unwrap();
    std::fs::write(dir.path().join("configs/default.toml"), default_study_with_a_reward_model()).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["compare", "--preset", "quick", "--quiet"])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let reports = dir.path().join("reports/default-quick");
    for file in [
        "config.json",
        "provenance.json",
        "summary.csv",
        "summary.json",
        "report.md",
        "base/model.safetensors",
        "base/tokenizer.json",
        "reward_model/model.safetensors",
        "reward_model/tokenizer.json",
        "reward_model/metrics.json",
    ] {
        assert!(reports.join(file).is_file(), "{file} missing");
    }
    // What the study read and where it ran: the base it trained, hashed, and this machine.
    let provenance: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("provenance.json")).unwrap()).unwrap();
    let base = &provenance["inputs"][0];
    assert_eq!(base["role"], "policy.base", "{provenance}");
    let weights = base["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("base/model.safetensors"))
        .expect("the base's weights are hashed");
    assert_eq!(weights["sha256"].as_str().unwrap().len(), 64);
    assert!(
        provenance["machine"]["threads"].as_u64().unwrap() >= 1 && provenance["machine"]["backend"] == "flex",
        "{provenance}"
    );
    let rm_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("reward_model/config.json")).unwrap()).unwrap();
    assert_eq!(rm_config["intermediate_size"], 96, "{rm_config}");
    let rm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("reward_model/metrics.json")).unwrap()).unwrap();
    let rm_accuracy = rm["held_out_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rm_accuracy) && rm["held_out_pairs"].as_u64().unwrap() > 0, "{rm}");
    // Per kind of rejected answer; the synthetic pairs rotate through the three kinds (the quick
    // base may answer too badly for policy-sample pairs), so the overall accuracy lies within the
    // range of the kinds.
    let by_kind = rm["held_out_accuracy_by_corruption"].as_object().unwrap();
    let kinds: Vec<&str> = by_kind.keys().map(String::as_str).filter(|kind| *kind != "policy_sample").collect();
    assert_eq!(kinds, ["broken_format", "corrupted_step", "wrong_answer"], "{rm}");
    assert!(
        rm["policy_samples"]["train"]["questions"].as_u64().unwrap() > 0,
        "the reward model's section samples the base: {rm}"
    );
    let values: Vec<f64> = by_kind.values().map(|v| v.as_f64().unwrap()).collect();
    let (low, high) = (values.iter().copied().fold(1.0, f64::min), values.iter().copied().fold(0.0, f64::max));
    assert!(low - 1e-9 <= rm_accuracy && rm_accuracy <= high + 1e-9, "{rm}");
    let summaries: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(reports.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summaries.len(), 6, "method x reward source x seed cells of the quick default study");
    for summary in &summaries {
        for key in [
            "method",
            "reward_source",
            "seed",
            "accuracy_strict",
            "accuracy_lenient",
            "accuracy_lenient_ci_low",
            "accuracy_lenient_ci_high",
            "train_seconds",
        ] {
            assert!(summary.get(key).is_some(), "{key} missing in {summary}");
        }
    }
    for summary in &summaries {
        assert!(summary["error"].is_null(), "every cell runs, PPO with the reward model included: {summary}");
    }
    let grpo = summaries.iter().find(|s| s["method"] == "grpo").unwrap();
    assert!(grpo["accuracy_lenient_ci_high"].as_f64().unwrap() > 0.0);
    let metrics = std::fs::read_to_string(reports.join("cells/grpo__rules__seed0/metrics.csv")).unwrap();
    let header = metrics.lines().next().unwrap();
    for column in ["step", "reward", "kl", "update_norm", "rewards/strict_correct/mean", "eval/accuracy_lenient"] {
        assert!(header.split(',').any(|c| c == column), "metrics.csv lacks {column}: {header}");
    }
    assert_eq!(
        metrics.lines().count(),
        1 + 1 + 3,
        "the held-out evaluation before training (step 0), then a row per step"
    );
    let step_zero = metrics.lines().nth(1).unwrap();
    assert!(step_zero.starts_with("grpo,rules,0,0,"), "{step_zero}");
    let eval_column = header.split(',').position(|c| c == "eval/accuracy_strict").unwrap();
    let reward_column = header.split(',').position(|c| c == "reward").unwrap();
    let fields: Vec<&str> = step_zero.split(',').collect();
    assert!(
        !fields[eval_column].is_empty() && fields[reward_column].is_empty(),
        "step 0 has an evaluation and no training: {step_zero}"
    );
    let ppo = std::fs::read_to_string(reports.join("cells/ppo__reward_model__seed0/metrics.csv")).unwrap();
    let ppo_header = ppo.lines().next().unwrap();
    // The model's score and the true correctness side by side, so reward hacking would show.
    for column in ["rewards/reward_model/mean", "rewards/strict_correct/mean", "val/explained_variance"] {
        assert!(ppo_header.split(',').any(|c| c == column), "PPO metrics.csv lacks {column}: {ppo_header}");
    }
    // The study's metrics.csv: every cell's step rows in one file, under the union of columns.
    let combined = std::fs::read_to_string(reports.join("metrics.csv")).unwrap();
    let combined_header: Vec<&str> = combined.lines().next().unwrap().split(',').collect();
    assert_eq!(&combined_header[..4], &["method", "reward_source", "seed", "step"]);
    for column in ["reward", "rewards/reward_model/mean", "val/explained_variance", "eval/accuracy_lenient"] {
        assert!(combined_header.contains(&column), "the study's metrics.csv lacks {column}");
    }
    let rl_cells =
        summaries.iter().filter(|s| ["grpo", "ppo", "rloo"].contains(&s["method"].as_str().unwrap())).count();
    assert_eq!(combined.lines().count(), 1 + 4 * rl_cells, "step 0 and a row per step of every RL cell");
    assert!(combined.lines().any(|line| line.starts_with("ppo,reward_model,0,3,")), "{combined}");
    // Samples before and after training for the same questions.
    let samples = std::fs::read_to_string(reports.join("cells/grpo__rules__seed0/samples.jsonl")).unwrap();
    let stages: Vec<String> = samples
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["stage"].as_str().unwrap().to_string())
        .collect();
    assert!(stages.contains(&"before".to_string()) && stages.contains(&"after".to_string()), "{stages:?}");

    // compare rendered the charts; `plot` renders them again from the files alone.
    let plot = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["plot", "reports/default-quick"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(plot.status.success(), "{}", String::from_utf8_lossy(&plot.stderr));
    for chart in ["accuracy", "stability", "convergence"] {
        let png = reports.join(format!("charts/{chart}.png"));
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
        let reader = decoder.read_info().unwrap_or_else(|e| panic!("{} does not decode: {e}", png.display()));
        assert!(reader.info().width >= 800 && reader.info().height >= 600);
        let svg = std::fs::read_to_string(reports.join(format!("charts/{chart}.svg"))).unwrap();
        let document = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{chart}.svg does not parse: {e}"));
        assert_eq!(document.root_element().tag_name().name(), "svg");
        let text: String = document.descendants().filter_map(|node| node.text()).collect::<Vec<_>>().join(" ");
        assert!(text.len() > 20, "{chart}.svg has a title, axis labels and a legend: {text}");
        if chart == "accuracy" {
            for label in ["grpo (rules)", "ppo (reward_model)", "few_shot_0", "accuracy (%"] {
                assert!(text.contains(label), "accuracy.svg lacks {label:?}: {text}");
            }
        }
    }
    let report = std::fs::read_to_string(reports.join("report.md")).unwrap();
    assert!(report.contains("charts/accuracy.svg") && report.contains("charts/convergence.svg"), "{report}");
    assert!(report.contains("| grpo | rules | 1 |"), "{report}");
    let csv_header = std::fs::read_to_string(reports.join("summary.csv")).unwrap().lines().next().unwrap().to_string();
    assert!(csv_header.starts_with("method,reward_source,seed,accuracy_strict"), "{csv_header}");
    // A rerun skips the finished cells and reuses the base and the reward model.
    let second = run();
    assert!(second.status.success());
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(log.contains("grpo__rules__seed0: done earlier, skipped"), "{log}");
    assert!(log.contains("ppo__reward_model__seed0: done earlier, skipped"), "{log}");
    assert!(log.contains("base policy: ") && log.contains("trained earlier"), "{log}");
    assert!(log.contains("reward model: ") && log.contains("trained earlier"), "{log}");
}

/// `policy.lora` end to end: every RL cell keeps its trained adapters in PEFT's layout, naming
/// the study's base, and the training differs from the full fine-tuning of the same study.
#[test]
fn a_lora_study_saves_each_rl_cells_adapters() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("configs")).unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml");
    let text = std::fs::read_to_string(config).unwrap();
    let lora = text.replacen("[policy]\n", "[policy]\nlora = { rank = 2, alpha = 4.0 }\n", 1).replacen(
        "name = \"default\"",
        "name = \"lora\"",
        1,
    );
    assert!(
        lora.contains("lora = {") && lora.contains("name = \"lora\""),
        "configs/default.toml's [policy] or name moved"
    );
    std::fs::write(dir.path().join("configs/default.toml"), text).unwrap();
    std::fs::write(dir.path().join("configs/lora.toml"), lora).unwrap();
    let run = |file: &str| {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["compare", file, "--preset", "quick", "--quiet"])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    for file in ["configs/lora.toml", "configs/default.toml"] {
        let output = run(file);
        assert!(output.status.success(), "{file}: {}", String::from_utf8_lossy(&output.stderr));
    }
    let reports = dir.path().join("reports");
    for cell in ["grpo__rules__seed0", "ppo__rules__seed0", "rloo__rules__seed0"] {
        let adapter = reports.join("lora-quick/cells").join(cell).join("adapter");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(
            (config["peft_type"].as_str(), config["r"].as_u64(), config["lora_alpha"].as_f64()),
            (Some("LORA"), Some(2), Some(4.0)),
            "{cell}: {config}"
        );
        let base = std::path::PathBuf::from(config["base_model_name_or_path"].as_str().unwrap());
        assert!(base.join("model.safetensors").is_file(), "{cell}: the adapters name the study's base: {config}");
        assert!(adapter.join("adapter_model.safetensors").is_file());
        assert!(
            !reports.join("default-quick/cells").join(cell).join("adapter").exists(),
            "{cell}: no adapters without policy.lora"
        );
        // The symptom of LoRA being ignored: the same gradient norms with and without it.
        let grad_norms = |study: &str| {
            let text =
                std::fs::read_to_string(reports.join(study).join("cells").join(cell).join("metrics.csv")).unwrap();
            let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
            let column = header.iter().position(|c| *c == "grad_norm").unwrap();
            text.lines()
                .skip(1)
                .map(|line| line.split(',').nth(column).unwrap().to_string())
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
        };
        let (with, without) = (grad_norms("lora-quick"), grad_norms("default-quick"));
        assert!(!with.is_empty() && with != without, "{cell}: LoRA {with:?} vs full {without:?}");
    }
}

/// configs/default.toml with a tiny trained reward model scoring PPO's completions (the default
/// has none: trained from scratch it does not check answers, see the file), so that the study's
/// reward-model stage runs end to end: training on synthetic and policy-sample pairs, the
/// held-out report, reuse on a rerun. A feed-forward width other than the default (twice the
/// width) checks that the section reaches the saved model.
fn default_study_with_a_reward_model() -> String {
    let default =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml"))
            .unwrap();
    let reward_model = r#"[reward_model]
kind = "train"
intermediate_size = 96
policy_samples = { problems = 64, samples = 8, max_new_tokens = 40, temperature = 0.7, max_pairs_per_problem = 4 }
[reward_model.training]
steps = 600
batch_size = 16
learning_rate = 1e-3

[reward_sources.reward_model]
reward_model_weight = 1.0
rules = [{ kind = "strict_correct", format = "gsm8k_marker", weight = 0.0 }]

[reward_sources.rules]
"#;
    let text = default.replacen("[reward_sources.rules]\n", reward_model, 1).replacen(
        "algorithm = \"ppo\"\nreward_sources = [\"rules\"]",
        "algorithm = \"ppo\"\nreward_sources = [\"reward_model\"]",
        1,
    );
    assert!(
        text.contains("intermediate_size = 96") && text.contains("reward_sources = [\"reward_model\"]"),
        "configs/default.toml's [reward_sources.rules] or [methods.ppo] moved"
    );
    text
}

/// configs/default.toml cut around its reward sources and methods: what comes before the first
/// `[reward_sources.*]` (name, task, policy) and from `[evaluation]` on.
fn default_study_around_methods() -> (String, String) {
    let default =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml"))
            .unwrap();
    let head = &default[..default.find("[reward_sources.").expect("configs/default.toml has reward sources")];
    let tail = &default[default.find("[evaluation]\n").expect("configs/default.toml has [evaluation]")..];
    (head.to_string(), tail.to_string())
}

/// Cells that are no result: one fails at run time (more exemplars than the train split holds,
/// which only the loaded task can tell), one diverges (learning rate 1e3). The others finish;
/// `compare` runs them all, writes readable summaries (no `null` accuracies), draws the charts of
/// the finished cells, lists the failed and the diverged ones in report.md, keeps the diverged
/// cell's step rows, and exits non-zero naming the failed cell only.
#[test]
fn failed_and_diverged_cells_are_reported_and_the_rest_charted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("configs")).unwrap();
    // The default's task, policy and evaluation; no reward model; four methods.
    let (head, tail) = default_study_around_methods();
    let methods = r#"
[reward_sources.rules]
# Lenient correctness varies within a group even for the tiny base: the step has a gradient.
rules = [
  { kind = "strict_correct", format = "gsm8k_marker", weight = 1.0 },
  { kind = "lenient_correct", format = "gsm8k_marker", weight = 1.0 },
]

[methods.few_shot_0]
kind = "few_shot"
k = 0

[methods.few_shot_many]
kind = "few_shot"
k = 100000

[methods.grpo]
kind = "rl"
algorithm = "grpo"
reward_sources = ["rules"]
steps = 3
prompts_per_step = 2
optim = { learning_rate = 1e-4, max_grad_norm = 1.0, total_steps = 3 }
config = { num_generations = 4, max_completion_length = 16, beta = 0.04, temperature = 0.7 }

[methods.grpo_hot]
kind = "rl"
algorithm = "grpo"
reward_sources = ["rules"]
steps = 3
prompts_per_step = 2
optim = { learning_rate = 1e3, max_grad_norm = 1.0, total_steps = 3 }
config = { num_generations = 4, max_completion_length = 16, beta = 0.04, temperature = 0.7 }

"#;
    let study = format!("{}{methods}{tail}", head.replacen("name = \"default\"", "name = \"integrity\"", 1));
    assert!(study.contains("name = \"integrity\""), "configs/default.toml's name moved");
    std::fs::write(dir.path().join("configs/integrity.toml"), study).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["compare", "configs/integrity.toml", "--preset", "quick", "--quiet"])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let first = run();
    let stderr = String::from_utf8_lossy(&first.stderr).to_string();
    assert!(!first.status.success(), "a failed cell makes compare exit non-zero: {stderr}");
    let last_line =
        stderr.lines().find(|line| line.starts_with("Error: ")).unwrap_or_else(|| panic!("no error message: {stderr}"));
    assert!(
        last_line.contains("1 of 4 cells failed: few_shot_many__-__seed0"),
        "the message names the failed cell: {stderr}"
    );
    assert!(!last_line.contains("grpo_hot"), "a diverged cell is not a failure: {last_line}");
    let reports = dir.path().join("reports/integrity-quick");

    // summary.json parses as numbers or absent values: no `null` accuracy, no NaN.
    let text = std::fs::read_to_string(reports.join("summary.json")).unwrap();
    let summaries: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let by_method = |method: &str| {
        summaries.iter().find(|s| s["method"] == method).unwrap_or_else(|| panic!("{method} missing: {text}"))
    };
    assert_eq!(summaries.len(), 4);
    for (method, status) in
        [("few_shot_0", "finished"), ("grpo", "finished"), ("few_shot_many", "failed"), ("grpo_hot", "diverged")]
    {
        let summary = by_method(method);
        assert_eq!(summary["status"], status, "{summary}");
        let accuracy = summary.get("accuracy_lenient");
        if status == "finished" {
            assert!(accuracy.and_then(|v| v.as_f64()).is_some(), "{summary}");
        } else {
            assert!(
                accuracy.is_none() && summary.get("accuracy_strict_ci_low").is_none(),
                "no accuracy for a {status} cell: {summary}"
            );
            assert!(summary["error"].as_str().is_some_and(|e| !e.is_empty()), "{summary}");
        }
    }
    assert!(by_method("few_shot_many")["error"].as_str().unwrap().contains("100000"), "{text}");
    // The step is named once, with the fix.
    let reason = by_method("grpo_hot")["error"].as_str().unwrap().to_string();
    assert_eq!(reason.matches("step ").count(), 1, "{reason}");
    assert!(reason.starts_with("step 1: ") && reason.contains("learning_rate"), "{reason}");
    let cell_summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reports.join("cells/grpo_hot__rules__seed0/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cell_summary["status"], "diverged");

    // The diverged cell's rows up to the divergence are on disk: step 0 (evaluation) and step 1.
    let metrics = std::fs::read_to_string(reports.join("cells/grpo_hot__rules__seed0/metrics.csv")).unwrap();
    let header: Vec<&str> = metrics.lines().next().unwrap().split(',').collect();
    let update_column = header.iter().position(|c| *c == "update_norm").unwrap_or_else(|| panic!("{metrics}"));
    let rows: Vec<Vec<&str>> = metrics.lines().skip(1).map(|line| line.split(',').collect()).collect();
    assert_eq!(rows.iter().map(|row| row[3]).collect::<Vec<_>>(), ["0", "1"], "{metrics}");
    assert!(rows[1][update_column].parse::<f64>().unwrap() > 1.0, "{metrics}");
    // The finished RL cell's file is complete, as before.
    let grpo = std::fs::read_to_string(reports.join("cells/grpo__rules__seed0/metrics.csv")).unwrap();
    assert_eq!(grpo.lines().count(), 1 + 1 + 3, "{grpo}");
    // The study's metrics.csv has results only.
    let combined = std::fs::read_to_string(reports.join("metrics.csv")).unwrap();
    assert!(combined.lines().any(|l| l.starts_with("grpo,rules,0,3,")) && !combined.contains("grpo_hot"), "{combined}");
    let csv = std::fs::read_to_string(reports.join("summary.csv")).unwrap();
    assert!(
        csv.lines().next().unwrap().starts_with("method,reward_source,seed,accuracy_strict,")
            && csv.lines().count() == 5,
        "{csv}"
    );

    // Charts of the finished cells, from compare and again from `plot`.
    let plot = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["plot", "reports/integrity-quick"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(plot.status.success(), "{}", String::from_utf8_lossy(&plot.stderr));
    let svg = std::fs::read_to_string(reports.join("charts/accuracy.svg")).unwrap();
    let document = roxmltree::Document::parse(&svg).unwrap();
    let labels: String = document.descendants().filter_map(|node| node.text()).collect::<Vec<_>>().join(" ");
    assert!(labels.contains("grpo (rules)") && labels.contains("few_shot_0"), "{labels}");
    assert!(
        !labels.contains("grpo_hot") && !labels.contains("few_shot_many"),
        "no bar for a cell without a result: {labels}"
    );
    for chart in ["stability", "convergence"] {
        assert!(reports.join(format!("charts/{chart}.svg")).is_file());
    }
    let report = std::fs::read_to_string(reports.join("report.md")).unwrap();
    assert!(
        report.contains("| grpo | rules | 1 |") && report.contains("| grpo_hot | rules | 0 | diverged |"),
        "{report}"
    );
    assert!(
        report.contains("| few_shot_many | - | 0 | failed |") && report.contains("charts/accuracy.svg"),
        "{report}"
    );
    let diverged = &report[report.find("## Diverged cells").expect("a Diverged cells section")..];
    assert!(diverged.contains("- grpo_hot / rules / seed 0: step 1: "), "{report}");
    let failed = &report[report.find("## Failed cells").expect("a Failed cells section")..];
    assert!(failed.contains("- few_shot_many / - / seed 0: ") && !failed.contains("grpo_hot"), "{report}");

    // A rerun retries the failed cell and skips the finished and diverged ones.
    let second = run();
    assert!(!second.status.success());
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(
        log.contains("grpo_hot__rules__seed0: diverged earlier, skipped")
            && log.contains("grpo__rules__seed0: done earlier, skipped"),
        "{log}"
    );
    assert!(log.contains("few_shot_many__-__seed0: failed"), "{log}");
}

/// A study changed under the same name: a rerun refuses the results of the old settings, naming
/// what changed and leaving config.json as it was; `--force` redoes exactly what the change
/// touches (one method's learning rate: that method's cells; the supervised base's learning rate:
/// the base and every cell). A base half saved by a killed run is removed and trained again, and
/// one from an older cotlab (no identity.json) is refused as of unknown settings.
#[test]
fn a_changed_study_is_refused_and_force_redoes_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("configs")).unwrap();
    let (head, tail) = default_study_around_methods();
    let methods = r#"
[reward_sources.rules]
rules = [{ kind = "strict_correct", format = "gsm8k_marker", weight = 1.0 }]

[methods.few_shot_0]
kind = "few_shot"
k = 0

[methods.grpo]
kind = "rl"
algorithm = "grpo"
reward_sources = ["rules"]
steps = 2
prompts_per_step = 2
optim = { learning_rate = 1e-4, max_grad_norm = 1.0 }
config = { num_generations = 2, max_completion_length = 8, beta = 0.04, temperature = 0.7 }

"#;
    let study = format!("{}{methods}{tail}", head.replacen("name = \"default\"", "name = \"identity\"", 1));
    assert!(
        study.contains("name = \"identity\"") && study.contains("learning_rate = 3e-3\n"),
        "configs/default.toml's name or sft.learning_rate moved"
    );
    let path = dir.path().join("configs/identity.toml");
    std::fs::write(&path, &study).unwrap();
    let run = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["compare", "configs/identity.toml", "--preset", "quick", "--quiet"])
            .args(extra)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).to_string())
    };
    let (ok, log) = run(&[]);
    assert!(ok, "{log}");
    let reports = dir.path().join("reports/identity-quick");
    for artefact in ["base", "cells/grpo__rules__seed0", "cells/few_shot_0__-__seed0"] {
        let identity: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(reports.join(artefact).join("identity.json")).unwrap())
                .unwrap();
        assert_eq!(identity["hash"].as_str().map(str::len), Some(64), "{artefact}: {identity}");
        assert!(identity["config"]["task"].is_object(), "{artefact}: {identity}");
    }
    let grpo_identity = std::fs::read_to_string(reports.join("cells/grpo__rules__seed0/identity.json")).unwrap();
    assert!(grpo_identity.contains("\"learning_rate\": 0.0001"), "the resolved optim: {grpo_identity}");
    assert!(
        !std::fs::read_to_string(reports.join("cells/few_shot_0__-__seed0/identity.json")).unwrap().contains("grpo"),
        "another method's settings are no part of a cell"
    );
    let config = || std::fs::read_to_string(reports.join("config.json")).unwrap();
    let first_config = config();

    // One method's learning rate: refused, naming the field, old and new values; nothing rewritten.
    std::fs::write(&path, study.replace("optim = { learning_rate = 1e-4,", "optim = { learning_rate = 1e-3,")).unwrap();
    let (ok, log) = run(&[]);
    assert!(!ok, "{log}");
    assert!(
        log.contains("cell grpo__rules__seed0") && log.contains("methods.grpo.optim.learning_rate: 0.0001 -> 0.001"),
        "{log}"
    );
    assert!(log.contains("--force") && log.contains("new name"), "{log}");
    assert!(
        !log.contains("few_shot_0__-__seed0") && !log.contains("base policy ("),
        "only the changed method's cells: {log}"
    );
    assert_eq!(config(), first_config, "config.json keeps the settings of the results it sits beside");
    let (ok, log) = run(&["--force"]);
    assert!(ok, "{log}");
    assert!(
        log.contains("cell grpo__rules__seed0: made with other settings") && log.contains("redone (--force)"),
        "{log}"
    );
    assert!(!log.contains("grpo__rules__seed0: done earlier"), "{log}");
    assert!(log.contains("few_shot_0__-__seed0: done earlier, skipped") && log.contains("trained earlier"), "{log}");
    assert!(
        config().contains("0.001")
            && std::fs::read_to_string(reports.join("cells/grpo__rules__seed0/identity.json"))
                .unwrap()
                .contains("\"learning_rate\": 0.001")
    );

    // Killed between the base's files: the half-saved base is removed and trained again.
    std::fs::rename(reports.join("base"), reports.join(".base.partial")).unwrap();
    std::fs::remove_file(reports.join(".base.partial/tokenizer.json")).unwrap();
    let (ok, log) = run(&[]);
    assert!(ok, "{log}");
    assert!(
        log.contains("removed an incomplete base policy from an interrupted run: ") && log.contains(".base.partial"),
        "{log}"
    );
    assert!(log.contains("supervised steps, final loss"), "the base is trained again: {log}");
    assert!(!reports.join(".base.partial").exists() && reports.join("base/tokenizer.json").is_file());

    // What an older cotlab killed while saving the base left: weights, no tokenizer, no
    // identity.json. Refused as of unknown settings (not "has no tokenizer"); --force redoes it.
    std::fs::remove_file(reports.join("base/identity.json")).unwrap();
    std::fs::remove_file(reports.join("base/tokenizer.json")).unwrap();
    let (ok, log) = run(&[]);
    assert!(!ok && log.contains("base policy (") && log.contains("older cotlab, no identity.json"), "{log}");
    assert!(!log.contains("has no tokenizer"), "{log}");
    let (ok, log) = run(&["--force"]);
    assert!(ok, "{log}");
    assert!(
        log.contains("base policy: made with other settings") && log.contains("supervised steps, final loss"),
        "{log}"
    );
    assert!(reports.join("base/tokenizer.json").is_file() && reports.join("base/identity.json").is_file());

    // The supervised base's learning rate: the base and every cell.
    let current = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, current.replace("learning_rate = 3e-3\n", "learning_rate = 2e-3\n")).unwrap();
    let (ok, log) = run(&[]);
    assert!(!ok, "{log}");
    assert!(log.contains("policy.base.sft.learning_rate: 0.003 -> 0.002"), "{log}");
    for artefact in ["base policy (", "cell grpo__rules__seed0", "cell few_shot_0__-__seed0"] {
        assert!(log.contains(artefact), "{artefact}: {log}");
    }
    assert_eq!(
        log.matches("policy.base.sft.learning_rate").count(),
        1,
        "artefacts that differ alike are listed together: {log}"
    );
}

/// `reward_model.kind = "causal_lm"` from the study's trained base, with LoRA, with either score:
/// the score head is saved as a `*ForSequenceClassification` causal LM, the likelihood verifier
/// as the causal LM marked with its beta, each with its LoRA adapters and tokenizer; the held-out
/// figures are reported, and PPO trains on the scores.
#[test]
fn a_causal_lm_reward_model_from_the_base_rewards_ppo() {
    for (name, score, architecture) in [
        ("causal_rm", "", "GPTNeoForSequenceClassification"),
        ("likelihood_rm", "score = \"likelihood\"\nbeta = 5.0\n", "GPTNeoForCausalLM"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("configs")).unwrap();
        let (head, tail) = default_study_around_methods();
        let middle = format!(
            r#"
[reward_model]
kind = "causal_lm"
from_base = true
max_tokens = 160
lora = {{ rank = 4, alpha = 8.0 }}
{score}[reward_model.training]
steps = 20
batch_size = 8
learning_rate = 1e-3

[reward_sources.reward_model]
reward_model_weight = 1.0
rules = [{{ kind = "strict_correct", format = "gsm8k_marker", weight = 0.0 }}]

[methods.ppo]
kind = "rl"
algorithm = "ppo"
reward_sources = ["reward_model"]
steps = 3
prompts_per_step = 2
config = {{ max_completion_length = 16, num_ppo_epochs = 1, num_mini_batches = 1 }}

"#
        );
        let study = format!("{head}{middle}{tail}").replacen("name = \"default\"", &format!("name = \"{name}\""), 1);
        std::fs::write(dir.path().join(format!("configs/{name}.toml")), study).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["compare", &format!("configs/{name}.toml"), "--preset", "quick", "--quiet"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        let rm = dir.path().join(format!("reports/{name}-quick/reward_model"));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(rm.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], architecture, "{config}");
        if score.is_empty() {
            assert_eq!(config["num_labels"], 1);
        } else {
            assert_eq!(config["cotlab_reward"], serde_json::json!({ "score": "likelihood", "beta": 5.0 }));
        }
        for file in ["model.safetensors", "tokenizer.json", "adapter/adapter_config.json"] {
            assert!(rm.join(file).is_file(), "{name}: {file}");
        }
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(rm.join("metrics.json")).unwrap()).unwrap();
        assert_eq!(metrics["max_tokens"], 160);
        assert!(
            metrics["held_out_pairs"].as_u64().unwrap() > 0
                && metrics["held_out_accuracy_by_corruption"]["broken_format"].as_f64().is_some()
                && metrics["held_out_accuracy_at_start_by_corruption"]["broken_format"].as_f64().is_some(),
            "{name}: {metrics}"
        );
        let cell = dir.path().join(format!("reports/{name}-quick/cells/ppo__reward_model__seed0/metrics.csv"));
        let text = std::fs::read_to_string(cell).unwrap();
        assert!(text.lines().count() > 1, "{name}: PPO's steps are logged: {text}");
    }
}

/// `reward_model.policy_samples`: the base policy's own answers, paired by the rule checker, join
/// the reward model's training and held-out comparisons, and metrics.json reports them as their
/// own kind. The task is shrunk to one-digit operands up to 3 so that even the quick preset's
/// 30-step base answers some questions right and others wrong (on the default task it gets none
/// right, and a question whose samples all agree gives no pair).
#[test]
fn policy_sample_comparisons_are_reported_as_their_own_kind() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("configs")).unwrap();
    let (head, tail) = default_study_around_methods();
    let middle = r#"
[reward_model]
kind = "train"
policy_samples = { problems = 8, samples = 4, max_new_tokens = 16, max_pairs_per_problem = 4 }
[reward_model.training]
steps = 5

[reward_sources.reward_model]
reward_model_weight = 1.0

[methods.base]
kind = "base"

"#;
    let study = format!("{head}{middle}{tail}")
        .replacen("name = \"default\"", "name = \"policy_pairs\"", 1)
        .replacen("max_operand = 9", "max_operand = 3", 1)
        .replacen("train_size = 4000", "train_size = 100", 1)
        .replacen("test_size = 400", "test_size = 20", 1);
    assert!(study.contains("max_operand = 3") && study.contains("train_size = 100"), "default.toml's task moved");
    std::fs::write(dir.path().join("configs/policy_pairs.toml"), study).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["compare", "configs/policy_pairs.toml", "--preset", "quick", "--quiet"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("reports/policy_pairs-quick/reward_model/metrics.json")).unwrap(),
    )
    .unwrap();
    let accuracy = metrics["held_out_accuracy_by_corruption"]["policy_sample"].as_f64();
    assert!(accuracy.is_some_and(|a| (0.0..=1.0).contains(&a)), "{metrics}");
    let counts = &metrics["policy_samples"];
    let held_out_pairs = counts["held_out"]["pairs"].as_u64().unwrap();
    assert!(held_out_pairs > 0 && counts["train"]["pairs"].as_u64().unwrap() > 0, "{metrics}");
    assert_eq!(metrics["held_out_pairs_by_corruption"]["policy_sample"].as_u64(), Some(held_out_pairs), "{metrics}");
    // Pairs come only from questions with both outcomes, at most 4 each of at most 8 questions.
    let with_pairs = counts["held_out"]["questions_with_pairs"].as_u64().unwrap();
    assert!(with_pairs <= 8 && held_out_pairs <= 4 * with_pairs, "{metrics}");
    let sample_accuracy = counts["held_out"]["sample_accuracy"].as_f64().unwrap();
    assert!(0.0 < sample_accuracy && sample_accuracy < 1.0, "{metrics}");
    let total: u64 =
        metrics["held_out_pairs_by_corruption"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, metrics["held_out_pairs"].as_u64().unwrap(), "{metrics}");
    // Each held-out pair with its scores before and after training, one JSON line each: the
    // reported accuracy is the share of lines that rank chosen first.
    let lines =
        std::fs::read_to_string(dir.path().join("reports/policy_pairs-quick/reward_model/held_out_scores.jsonl"))
            .unwrap();
    let scores: Vec<serde_json::Value> = lines.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(scores.len() as u64, metrics["held_out_pairs"].as_u64().unwrap());
    let own: Vec<&serde_json::Value> = scores.iter().filter(|s| s["corruption"] == "policy_sample").collect();
    assert_eq!(own.len() as u64, held_out_pairs);
    let right = own.iter().filter(|s| s["chosen_score"].as_f64() > s["rejected_score"].as_f64()).count();
    assert!((right as f64 / own.len() as f64 - accuracy.unwrap()).abs() < 1e-9, "{metrics}");
    assert!(own.iter().all(|s| s["at_start"].as_array().is_some_and(|start| start.len() == 2)));
}
