//! The causal-LM reward model against transformers' `LlamaForSequenceClassification`,
//! `Qwen2ForSequenceClassification` and `GPTNeoForSequenceClassification` on tiny random
//! checkpoints (made by `tools/parity/make_causal_reward_model_fixtures.py`): scores within 1e-4
//! on right-, left- and unpadded rows; saving and reloading; a causal-LM checkpoint loads with
//! an initialised head.

use std::path::PathBuf;

use burn::tensor::Device;
use policy_models::CausalLm;
use reward_model::{CausalRewardModel, HeadSource};

const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "gpt_neo"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("causal_rm_{name}"))
}

struct Reference {
    ids: Vec<Vec<i64>>,
    mask: Vec<Vec<bool>>,
    scores: Vec<f32>,
}

fn reference(name: &str) -> Reference {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(json["attention_mask"].clone()).unwrap();
    Reference {
        ids: serde_json::from_value(json["input_ids"].clone()).unwrap(),
        mask: mask.into_iter().map(|row| row.into_iter().map(|m| m == 1).collect()).collect(),
        scores: serde_json::from_value(json["scores"].clone()).unwrap(),
    }
}

fn scores(model: &CausalRewardModel, reference: &Reference) -> Vec<f32> {
    model.score(&reference.ids, &reference.mask).into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn scores_match_transformers_within_1e_4_with_either_padding() {
    let device = Device::flex();
    for name in ARCHITECTURES {
        let (model, head) = CausalRewardModel::load_dir(&fixture(name), None, &device).unwrap();
        assert_eq!(head, HeadSource::Loaded, "{name}");
        assert_eq!(model.pad_token_id(), 0, "{name}: pad_token_id from config.json");
        let reference = reference(name);
        let ours = scores(&model, &reference);
        for (row, (ours, theirs)) in ours.iter().zip(&reference.scores).enumerate() {
            assert!((ours - theirs).abs() < 1e-4, "{name} row {row}: score {ours} vs transformers {theirs}");
        }
        // Scores differ between rows, so a row scored at a wrong position would show.
        assert!(
            reference.scores.windows(2).all(|pair| (pair[0] - pair[1]).abs() > 1e-3),
            "{name}: {:?}",
            reference.scores
        );
    }
}

#[test]
fn a_saved_model_reloads_with_the_same_scores() {
    let device = Device::flex();
    for name in ARCHITECTURES {
        let (model, _) = CausalRewardModel::load_dir(&fixture(name), None, &device).unwrap();
        let reference = reference(name);
        let dir = tempfile::tempdir().unwrap();
        model.save_dir(dir.path()).unwrap();
        // `tools/parity/check_saved.py` loads what is kept here with transformers.
        if let Some(keep) = std::env::var_os("COTLAB_KEEP_SAVED") {
            model.save_dir(&std::path::Path::new(&keep).join(format!("causal_rm_{name}"))).unwrap();
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert!(
            config["architectures"][0].as_str().unwrap().ends_with("ForSequenceClassification"),
            "{name}: {config}"
        );
        assert_eq!(config["num_labels"], 1);
        let (reloaded, head) = CausalRewardModel::load_dir(dir.path(), None, &device).unwrap();
        assert_eq!(head, HeadSource::Loaded);
        assert_eq!(scores(&reloaded, &reference), scores(&model, &reference), "{name}");
    }
}

#[test]
fn a_causal_lm_checkpoint_loads_with_an_initialised_head() {
    let device = Device::flex();
    let (model, _) = CausalRewardModel::load_dir(&fixture("llama"), None, &device).unwrap();
    // The trunk saved as a LlamaForCausalLM (with an LM head), without pad_token_id.
    let dir = tempfile::tempdir().unwrap();
    model.trunk().save_dir(dir.path(), None).unwrap();
    assert!(CausalRewardModel::load_dir(dir.path(), None, &device).is_err(), "no pad_token_id anywhere is an error");
    let (fresh, head) = CausalRewardModel::load_dir(dir.path(), Some(0), &device).unwrap();
    assert_eq!(head, HeadSource::Initialised);
    let reference = reference("llama");
    let fresh_scores = scores(&fresh, &reference);
    assert!(fresh_scores.iter().all(|s| s.is_finite()));
    assert_ne!(fresh_scores, reference.scores, "the head is new, the scores are not the trained head's");
    // The same trunk in memory takes a head the same way.
    let trunk = CausalLm::load_dir(dir.path(), &device).unwrap();
    let in_memory = CausalRewardModel::from_lm(trunk, 0, &device);
    assert_eq!(scores(&in_memory, &reference).len(), reference.ids.len());
}
