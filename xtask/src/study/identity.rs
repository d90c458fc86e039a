//! What produced each artefact of a study: the base policy, the reward model and every cell keep
//! beside them (`identity.json`) the resolved settings they depend on, and nothing else, with
//! their hash. A rerun reuses an artefact only when its identity matches the study's, so a study
//! changed under the same name never passes old results off as new ones; a change to one method
//! invalidates only that method's cells, a change to the base every cell.
//!
//! The settings keep the study file's own paths (`methods.grpo.optim.learning_rate`), so a
//! mismatch names what changed as the user wrote it.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::write_atomically;
use crate::study::config::{Cell, MethodSpec, PolicyBase, RewardModelSpec, Study, registry};

/// The file, inside each artefact's directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// The resolved settings an artefact was produced with, and their hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// sha256 of `config` as canonical JSON (keys sorted, no whitespace), in hex.
    pub hash: String,
    /// The settings, under the study file's paths.
    pub config: Value,
}

impl Identity {
    /// The identity of `config`.
    pub fn new(config: Value) -> Self {
        let digest = Sha256::digest(canonical(&config).as_bytes());
        Self { hash: digest.iter().map(|byte| format!("{byte:02x}")).collect(), config }
    }

    /// Writes `dir/identity.json`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_atomically(&dir.join(IDENTITY_FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// JSON with every object's keys sorted, whatever the map type's order, so the hash depends on
/// the settings only.
fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> =
                keys.into_iter().map(|key| format!("{}:{}", Value::from(key.as_str()), canonical(&map[key]))).collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// `overlay`'s fields added to `target`, objects merged field by field.
fn merge(target: &mut Value, overlay: Value) {
    match (target, overlay) {
        (Value::Object(target), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match target.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        target.insert(key, value);
                    }
                }
            }
        }
        (target, overlay) => *target = overlay,
    }
}

/// The base policy's settings. A preset trained here: the task (its train split is the
/// supervised data and the tokenizer's corpus), the template, `max_length` and `policy.base`
/// (preset, vocabulary, supervised training). A checkpoint: its reference only.
pub fn base_config(study: &Study) -> anyhow::Result<Value> {
    Ok(match &study.policy.base {
        PolicyBase::Checkpoint { .. } => json!({ "policy": { "base": study.policy.base } }),
        PolicyBase::Preset { .. } => {
            let mut config = json!({
                "task": study.task,
                "policy": { "base": study.policy.base, "template": study.policy.template, "max_length": study.policy.max_length },
            });
            // The supervised run's optimizer is not a study setting, but its defaults are
            // cotlab's: a release that changes them retrains the base.
            merge(
                &mut config,
                json!({ "policy": { "base": { "sft": { "adamw": policy_models::optim::AdamWSettings::default() } } } }),
            );
            config
        }
    })
}

/// The reward model's settings, when a reward source uses one: `reward_model`, plus what its
/// training reads (the task and the template that build its comparisons, and the base's identity
/// when it reads text with the base's tokenizer). A checkpoint used as it is: its reference only.
pub fn reward_model_config(study: &Study) -> anyhow::Result<Option<Value>> {
    let needed = study.reward_sources.values().any(|source| source.reward_model_weight.is_some());
    let Some(spec) = study.reward_model.as_ref().filter(|_| needed) else { return Ok(None) };
    // Policy-sample comparisons come from the base policy: the reward model then depends on it
    // whatever its own starting point.
    let from_base = spec.policy_samples().is_some();
    Ok(Some(match spec {
        RewardModelSpec::Checkpoint { fine_tune: None, .. } => json!({ "reward_model": spec }),
        _ if from_base => {
            let mut config = base_config(study)?;
            merge(
                &mut config,
                json!({ "reward_model": spec, "task": study.task, "policy": { "template": study.policy.template } }),
            );
            config
        }
        RewardModelSpec::Checkpoint { fine_tune: Some(_), .. } => {
            json!({ "reward_model": spec, "task": study.task, "policy": { "template": study.policy.template } })
        }
        RewardModelSpec::CausalLm { from_base: false, .. } => {
            json!({ "reward_model": spec, "task": study.task, "policy": { "template": study.policy.template } })
        }
        RewardModelSpec::Train { .. } | RewardModelSpec::CausalLm { from_base: true, .. } => {
            let mut config = base_config(study)?;
            merge(
                &mut config,
                json!({ "reward_model": spec, "task": study.task, "policy": { "template": study.policy.template } }),
            );
            config
        }
    }))
}

/// A cell's settings: the base's identity, the reward model's when its reward source uses it,
/// its method (an RL method's `optim` as the runner resolves it, its schedule spanning the run's
/// optimizer steps), its reward source, its seed, the evaluation, the policy settings every
/// method reads (template, chat template, LoRA, `max_length`) and the task. Other methods,
/// reward sources and seeds are not part of it: changing them leaves this cell valid.
pub fn cell_config(study: &Study, cell: &Cell) -> anyhow::Result<Value> {
    let mut config = base_config(study)?;
    let method =
        study.methods.get(&cell.method).with_context(|| format!("cell {}: no [methods.{}]", cell.id(), cell.method))?;
    let mut method_value = serde_json::to_value(method)?;
    if let MethodSpec::Rl { algorithm, config: algorithm_config, .. } = method {
        method_value["optim"] = serde_json::to_value(study.rl_optim(&cell.method, registry())?)?;
        // With the algorithm's defaults filled in: a release that changes a default changes
        // the cells that relied on it.
        let entry = registry()
            .iter()
            .find(|entry| entry.name == algorithm)
            .with_context(|| format!("methods.{}: no algorithm {algorithm}", cell.method))?;
        method_value["config"] = (entry.resolve)(algorithm_config)
            .map_err(|error| anyhow::anyhow!("methods.{}.config: {error}", cell.method))?;
        let source = study
            .reward_sources
            .get(&cell.reward_source)
            .with_context(|| format!("cell {}: no [reward_sources.{}]", cell.id(), cell.reward_source))?;
        if source.reward_model_weight.is_some()
            && let Some(reward_model) = reward_model_config(study)?
        {
            merge(&mut config, reward_model);
        }
        merge(&mut config, json!({ "reward_sources": { cell.reward_source.clone(): source } }));
    }
    merge(
        &mut config,
        json!({
            "task": study.task,
            "policy": {
                "template": study.policy.template,
                "chat_template": study.policy.chat_template,
                "lora": study.policy.lora,
                "max_length": study.policy.max_length,
            },
            "methods": { cell.method.clone(): method_value },
            "seed": cell.seed,
            "evaluation": study.evaluation,
        }),
    );
    Ok(config)
}

/// How an artefact on disk compares with the study's settings for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Nothing there yet.
    Absent,
    /// Produced with these very settings.
    Matches,
    /// Produced with other settings: what differs, one line each (`path: old -> new`).
    Differs(Vec<String>),
}

/// Compares the artefact in `dir` with `expected`. A directory without `identity.json` (written
/// by an older cotlab, or a cell killed before it started) differs: what produced it is unknown.
pub fn check(dir: &Path, expected: &Identity) -> anyhow::Result<Check> {
    let empty = std::fs::read_dir(dir).map(|mut entries| entries.next().is_none()).unwrap_or(true);
    if empty {
        return Ok(Check::Absent);
    }
    let path = dir.join(IDENTITY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Check::Differs(vec![
                "written by an older cotlab, no identity.json: its settings are unknown".to_string(),
            ]));
        }
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    let Ok(stored) = serde_json::from_str::<Identity>(&text) else {
        return Ok(Check::Differs(vec![format!("{} does not parse: its settings are unknown", path.display())]));
    };
    if stored.hash == expected.hash && stored.config == expected.config {
        return Ok(Check::Matches);
    }
    let mut lines = Vec::new();
    differences("", &stored.config, &expected.config, &mut lines);
    if lines.is_empty() {
        lines.push(format!("the hash differs ({} -> {}) with the same settings", stored.hash, expected.hash));
    }
    Ok(Check::Differs(lines))
}

/// Every path where `old` and `new` differ, as `path: old -> new` (`(absent)` for a missing field).
pub fn differences(path: &str, old: &Value, new: &Value, lines: &mut Vec<String>) {
    let join = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                match (old.get(key), new.get(key)) {
                    (Some(a), Some(b)) => differences(&join(key), a, b, lines),
                    (a, b) => lines.push(format!("{}: {} -> {}", join(key), shown(a), shown(b))),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (index, (a, b)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{index}]"), a, b, lines);
            }
        }
        (a, b) if a != b => {
            lines.push(format!("{}: {} -> {}", if path.is_empty() { "(settings)" } else { path }, a, b))
        }
        _ => {}
    }
}

fn shown(value: Option<&Value>) -> String {
    value.map_or_else(|| "(absent)".to_string(), Value::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study(extra: &str) -> Study {
        study_with_rm("kind = \"train\"\n", extra)
    }

    /// The test study with `rm` as its `[reward_model]` section.
    fn study_with_rm(rm: &str, extra: &str) -> Study {
        let text = format!(
            "name = \"t\"\nseeds = [0, 1]\n[task]\nkind = \"synthetic\"\n[policy]\ntemplate = \"plain\"\n[policy.base]\nkind = \"preset\"\npreset = \"tiny_gpt_neo\"\nvocab_size = 384\n\
             [policy.base.sft]\nlearning_rate = 1e-3\n[reward_model]\n{rm}\
             [reward_sources.rules]\nrules = [{{ kind = \"strict_correct\", format = \"gsm8k_marker\" }}]\n[reward_sources.rm]\nreward_model_weight = 1.0\n\
             [methods.grpo]\nkind = \"rl\"\nalgorithm = \"grpo\"\nreward_sources = [\"rules\", \"rm\"]\nsteps = 2\noptim = {{ learning_rate = 1e-4 }}\n\
             [methods.rloo]\nkind = \"rl\"\nalgorithm = \"rloo\"\nreward_sources = [\"rules\"]\nsteps = 2\n[methods.fs]\nkind = \"few_shot\"\nk = 1\n{extra}"
        );
        let study: Study = toml::from_str(&text).unwrap();
        study.validate(registry()).unwrap();
        study
    }

    fn cell(method: &str, source: &str, seed: u64) -> Cell {
        Cell { method: method.into(), reward_source: source.into(), seed }
    }

    fn hashes(study: &Study) -> (String, Option<String>, std::collections::BTreeMap<String, String>) {
        let cells = study
            .matrix()
            .iter()
            .map(|cell| (cell.id(), Identity::new(cell_config(study, cell).unwrap()).hash))
            .collect();
        (
            Identity::new(base_config(study).unwrap()).hash,
            reward_model_config(study).unwrap().map(|c| Identity::new(c).hash),
            cells,
        )
    }

    #[test]
    fn the_hash_is_of_the_settings_not_their_order() {
        let a = Identity::new(json!({ "b": 1, "a": { "y": [1, 2], "x": 0.0001 } }));
        let b = Identity::new(serde_json::from_str(r#"{ "a": { "x": 0.0001, "y": [1, 2] }, "b": 1 }"#).unwrap());
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.hash.len(), 64);
        assert_ne!(a.hash, Identity::new(json!({ "b": 2, "a": { "y": [1, 2], "x": 0.0001 } })).hash);
        assert_eq!(canonical(&json!({ "b": [1, "x"], "a": null })), r#"{"a":null,"b":[1,"x"]}"#);
    }

    /// A change to one method's settings invalidates that method's cells only; a change to the
    /// base (its supervised learning rate or vocabulary) invalidates the base, the reward model
    /// that reads its tokenizer, and every cell; an evaluation change every cell but neither the
    /// base nor the reward model; the reward model's own settings only the cells that use it.
    #[test]
    fn each_change_invalidates_exactly_what_depends_on_it() {
        let (base, rm, cells) = hashes(&study(""));
        assert_eq!(cells.len(), 2 * 2 + 2 + 2);
        let stale = |other: &std::collections::BTreeMap<String, String>| {
            other
                .iter()
                .filter(|(id, hash)| cells.get(*id).is_some_and(|old| old != *hash))
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>()
        };

        let mut grpo = study("");
        let Some(MethodSpec::Rl { optim, .. }) = grpo.methods.get_mut("grpo") else { panic!() };
        optim.learning_rate = 1e-3;
        let (b, r, c) = hashes(&grpo);
        assert_eq!((b, r), (base.clone(), rm.clone()));
        assert_eq!(stale(&c), ["grpo__rm__seed0", "grpo__rm__seed1", "grpo__rules__seed0", "grpo__rules__seed1"]);

        for edit in ["sft.learning_rate", "vocab_size"] {
            let mut changed = study("");
            let PolicyBase::Preset { vocab_size, sft, .. } = &mut changed.policy.base else { panic!() };
            match edit {
                "vocab_size" => *vocab_size = 400,
                _ => sft.learning_rate = 2e-3,
            }
            let (b, r, c) = hashes(&changed);
            assert_ne!(b, base, "{edit}");
            assert_ne!(r, rm, "{edit}: the tiny reward model reads the base's tokenizer");
            assert_eq!(stale(&c).len(), cells.len(), "{edit}");
        }

        let (b, r, c) = hashes(&study("[evaluation]\ntest_size = 7\n"));
        assert_eq!((b, r), (base.clone(), rm.clone()));
        assert_eq!(stale(&c).len(), cells.len());

        let mut wider = study("");
        let Some(RewardModelSpec::Train { hidden_size, .. }) = &mut wider.reward_model else { panic!() };
        *hidden_size = 128;
        let (b, r, c) = hashes(&wider);
        assert_eq!(b, base);
        assert_ne!(r, rm);
        assert_eq!(stale(&c), ["grpo__rm__seed0", "grpo__rm__seed1"]);

        // Comparisons from the base's own samples: a new reward model, the same base; with them a
        // fine-tuned checkpoint depends on the base too.
        let samples = "policy_samples = { problems = 4, samples = 4 }\n";
        let sampled = study_with_rm(&format!("kind = \"train\"\n{samples}"), "");
        let (b, r, c) = hashes(&sampled);
        assert_eq!(b, base);
        assert_ne!(r, rm);
        assert_eq!(stale(&c), ["grpo__rm__seed0", "grpo__rm__seed1"]);
        let (_, more_samples, _) =
            hashes(&study_with_rm("kind = \"train\"\npolicy_samples = { problems = 4, samples = 5 }\n", ""));
        assert_ne!(more_samples, r, "the number of samples is part of the reward model");
        let checkpoint = "kind = \"checkpoint\"\nmodel = \"owner/name@main\"\nfine_tune = {}\n";
        for (rm_fields, depends_on_base) in [(checkpoint.to_string(), false), (format!("{checkpoint}{samples}"), true)]
        {
            let one = study_with_rm(&rm_fields, "");
            let mut other = one.clone();
            let PolicyBase::Preset { sft, .. } = &mut other.policy.base else { panic!() };
            sft.learning_rate = 2e-3;
            assert_eq!(hashes(&one).1 != hashes(&other).1, depends_on_base, "{rm_fields}");
        }

        // Adding a seed or a method leaves the existing cells valid (the new ones are new).
        let mut more = study("[methods.base]\nkind = \"base\"\n");
        more.seeds.push(2);
        let (b, _, c) = hashes(&more);
        assert_eq!(b, base);
        assert_eq!(c.len(), cells.len() + 7, "a third seed of every cell and the base method's");
        assert!(stale(&c).is_empty(), "{:?}", stale(&c));
    }

    /// A cell records its algorithm's settings with the defaults filled in: writing a default out
    /// changes nothing, and a release that changes a default (RLOO's `beta` did) would change the
    /// recorded value, so the cell is redone rather than reused.
    #[test]
    fn a_cell_records_the_algorithm_defaults_it_ran_with() {
        let config = |study: &Study| cell_config(study, &cell("rloo", "rules", 0)).unwrap();
        let implicit = config(&study(""));
        assert_eq!(implicit["methods"]["rloo"]["config"]["beta"], json!(0.05), "{implicit}");
        let mut explicit = study("");
        let Some(MethodSpec::Rl { config: written, .. }) = explicit.methods.get_mut("rloo") else { panic!() };
        *written = json!({ "beta": 0.05, "num_generations": 4 });
        assert_eq!(Identity::new(config(&explicit)).hash, Identity::new(implicit.clone()).hash);
        *match explicit.methods.get_mut("rloo") {
            Some(MethodSpec::Rl { config, .. }) => config,
            _ => panic!(),
        } = json!({ "beta": 0.0 });
        let mut lines = Vec::new();
        differences("", &implicit, &config(&explicit), &mut lines);
        assert_eq!(lines, ["methods.rloo.config.beta: 0.05 -> 0.0"]);
    }

    #[test]
    fn a_checkpoint_base_is_known_by_its_reference() {
        let mut checkpoint = study("");
        checkpoint.policy.base = PolicyBase::Checkpoint { model: "owner/name@main".into() };
        checkpoint.reward_model = None;
        checkpoint.reward_sources.remove("rm");
        let Some(MethodSpec::Rl { reward_sources, .. }) = checkpoint.methods.get_mut("grpo") else { panic!() };
        reward_sources.retain(|s| s == "rules");
        assert_eq!(
            base_config(&checkpoint).unwrap(),
            json!({ "policy": { "base": { "kind": "checkpoint", "model": "owner/name@main" } } })
        );
        assert_eq!(reward_model_config(&checkpoint).unwrap(), None);
        let mut chat = checkpoint.clone();
        chat.policy.chat_template = true;
        let config = |study: &Study| cell_config(study, &cell("fs", "-", 0)).unwrap();
        assert_ne!(
            Identity::new(config(&checkpoint)).hash,
            Identity::new(config(&chat)).hash,
            "the chat template changes a cell's prompts"
        );
        assert_eq!(config(&chat)["policy"]["chat_template"], json!(true));
    }

    #[test]
    fn differences_name_each_changed_path_with_old_and_new_values() {
        let old = json!({ "methods": { "grpo": { "optim": { "learning_rate": 0.0001, "total_steps": 2 } } }, "seed": 0, "list": [1, 2] });
        let new = json!({ "methods": { "grpo": { "optim": { "learning_rate": 0.001, "total_steps": 2 }, "few_shot_k": 1 } }, "seed": 0, "list": [1, 3] });
        let mut lines = Vec::new();
        differences("", &old, &new, &mut lines);
        assert_eq!(
            lines,
            [
                "list[1]: 2 -> 3",
                "methods.grpo.few_shot_k: (absent) -> 1",
                "methods.grpo.optim.learning_rate: 0.0001 -> 0.001"
            ]
        );
    }

    #[test]
    fn check_tells_absent_matching_changed_and_unknown_artefacts_apart() {
        let dir = tempfile::tempdir().unwrap();
        let artefact = dir.path().join("base");
        let expected = Identity::new(json!({ "policy": { "max_length": 128 } }));
        assert_eq!(check(&artefact, &expected).unwrap(), Check::Absent);
        std::fs::create_dir_all(&artefact).unwrap();
        assert_eq!(check(&artefact, &expected).unwrap(), Check::Absent, "an empty directory holds nothing to reuse");
        std::fs::write(artefact.join("model.safetensors"), b"").unwrap();
        let Check::Differs(lines) = check(&artefact, &expected).unwrap() else {
            panic!("no identity.json is not a match")
        };
        assert!(lines[0].contains("older cotlab, no identity.json"), "{lines:?}");
        expected.write(&artefact).unwrap();
        assert_eq!(check(&artefact, &expected).unwrap(), Check::Matches);
        let Check::Differs(lines) =
            check(&artefact, &Identity::new(json!({ "policy": { "max_length": 64 } }))).unwrap()
        else {
            panic!()
        };
        assert_eq!(lines, ["policy.max_length: 128 -> 64"]);
        std::fs::write(artefact.join(IDENTITY_FILE), "{").unwrap();
        assert!(
            matches!(check(&artefact, &expected).unwrap(), Check::Differs(lines) if lines[0].contains("does not parse"))
        );
    }
}
