//! Bad checkpoints give errors that name the key, both shapes, or the file.

mod common;

use std::path::Path;

use burn::tensor::Device;
use policy_models::{CausalLm, LoadError};

/// Copies a fixture checkpoint into a temporary directory, editing its config.json.
fn edited_copy(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let (source, _) = common::fixture(name);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, serde_json::to_string(&config).unwrap()).unwrap();
    dir
}

fn load(dir: &Path) -> LoadError {
    CausalLm::load_dir(dir, &Device::flex()).unwrap_err()
}

#[test]
fn a_shape_mismatch_names_the_key_and_both_shapes() {
    let dir = edited_copy("gpt_neo", |config| config["vocab_size"] = 100.into());
    let error = load(dir.path());
    let message = error.to_string();
    assert!(matches!(error, LoadError::ShapeMismatch { .. }), "{message}");
    assert!(message.contains("transformer.wte.weight") && message.contains("[128, 32]") && message.contains("[100, 32]"), "{message}");
}

#[test]
fn a_missing_key_is_named() {
    let dir = edited_copy("qwen2_tied", |config| config["num_hidden_layers"] = 3.into());
    let message = load(dir.path()).to_string();
    assert!(message.contains("model.layers.2."), "{message}");
}

#[test]
fn unused_keys_are_an_error() {
    let dir = edited_copy("llama3", |config| config["num_hidden_layers"] = 1.into());
    let error = load(dir.path());
    assert!(matches!(error, LoadError::UnusedKeys { .. }), "{error}");
    assert!(error.to_string().contains("model.layers.1."), "{error}");
}

#[test]
fn a_corrupt_weight_file_names_the_file() {
    let dir = edited_copy("gpt_neo", |_| {});
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors at all").unwrap();
    let error = load(dir.path());
    assert!(matches!(error, LoadError::Safetensors { .. }), "{error}");
    assert!(error.to_string().contains("model.safetensors"), "{error}");
}

#[test]
fn an_unknown_architecture_or_missing_weights_say_what_is_wrong() {
    let dir = edited_copy("gpt_neo", |config| config["model_type"] = "mamba".into());
    assert!(load(dir.path()).to_string().contains("gpt_neo, qwen2, llama"));
    let dir = edited_copy("gpt_neo", |_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(matches!(load(dir.path()), LoadError::NoWeights { .. }));
}
