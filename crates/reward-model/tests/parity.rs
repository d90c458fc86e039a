//! The RoBERTa regressor against transformers on tiny random checkpoints (made by
//! `tools/parity/make_reward_model_fixtures.py`): scores within 1e-4.

use std::path::PathBuf;

use burn::tensor::Device;
use reward_model::{HeadSource, RobertaRegressor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("roberta_regressor").join("reference.json")).unwrap())
        .unwrap()
}

fn inputs(reference: &serde_json::Value) -> (Vec<Vec<i64>>, Vec<Vec<bool>>) {
    let ids: Vec<Vec<i64>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(reference["attention_mask"].clone()).unwrap();
    (ids, mask.into_iter().map(|row| row.into_iter().map(|m| m == 1).collect()).collect())
}

#[test]
fn scores_match_transformers_within_1e_4() {
    let device = Device::flex();
    let (model, head) = RobertaRegressor::load_dir(&fixture("roberta_regressor"), &device).unwrap();
    assert_eq!(head, HeadSource::Loaded);
    let reference = reference();
    let (ids, mask) = inputs(&reference);
    let scores = model.score(&ids, &mask).into_data().try_to_vec::<f32>().unwrap();
    let expected: Vec<f32> = serde_json::from_value(reference["scores"].clone()).unwrap();
    for (ours, theirs) in scores.iter().zip(&expected) {
        assert!((ours - theirs).abs() < 1e-4, "score {ours} vs transformers {theirs}");
    }
    // Saving and reloading gives the same scores.
    let dir = tempfile::tempdir().unwrap();
    model.save_dir(dir.path()).unwrap();
    // `tools/parity/check_saved.py --reward-model` loads what is kept here with transformers.
    if let Some(keep) = std::env::var_os("COTLAB_KEEP_SAVED") {
        model.save_dir(&std::path::Path::new(&keep).join("roberta_regressor")).unwrap();
    }
    let (reloaded, head) = RobertaRegressor::load_dir(dir.path(), &device).unwrap();
    assert_eq!(head, HeadSource::Loaded);
    assert_eq!(reloaded.score(&ids, &mask).into_data().try_to_vec::<f32>().unwrap(), scores);
}

#[test]
fn a_base_checkpoint_without_a_head_loads_with_an_initialised_head() {
    let device = Device::flex();
    let (model, head) = RobertaRegressor::load_dir(&fixture("roberta_base_mlm"), &device).unwrap();
    assert_eq!(head, HeadSource::Initialised, "the masked-LM head is skipped, the regression head initialised");
    let (ids, mask) = inputs(&reference());
    assert!(model.score(&ids, &mask).into_data().try_to_vec::<f32>().unwrap().iter().all(|s| s.is_finite()));
}
