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
    assert!(
        message.contains("transformer.wte.weight") && message.contains("[128, 32]") && message.contains("[100, 32]"),
        "{message}"
    );
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

/// Shard names of `model.safetensors.index.json` are joined to the checkpoint directory (or
/// fetched into the hub cache): a name with a separator or `..` would reach outside it.
#[test]
fn shard_names_in_the_index_must_be_plain_safetensors_file_names() {
    let dir = edited_copy("gpt_neo", |_| {});
    std::fs::rename(dir.path().join("model.safetensors"), dir.path().join("model-00001-of-00001.safetensors")).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    let write_index = |file: &str| {
        let json = serde_json::json!({ "metadata": {}, "weight_map": { "transformer.wte.weight": file } });
        std::fs::write(&index, json.to_string()).unwrap();
    };
    for bad in [
        "../model-00001-of-00001.safetensors",
        "sub/model.safetensors",
        "/tmp/model.safetensors",
        "sub\\model.safetensors",
        "model.bin",
        ".safetensors",
        "",
    ] {
        write_index(bad);
        let error = load(dir.path());
        let message = error.to_string();
        assert!(matches!(error, LoadError::BadIndex { .. }), "{bad:?}: {message}");
        assert!(
            message.contains("model.safetensors.index.json") && message.contains("weight_map.transformer.wte.weight"),
            "{bad:?}: {message}"
        );
    }
    // A plain name is read: the checkpoint loads from its one shard.
    write_index("model-00001-of-00001.safetensors");
    CausalLm::load_dir(dir.path(), &Device::flex()).unwrap();
}

/// A reference that looks like a path is a path: a typo in a directory name used to be read as
/// a hub id and downloaded.
#[test]
fn model_references_are_paths_or_owner_name_hub_ids() {
    use policy_models::ModelSource;
    let dir = edited_copy("gpt_neo", |_| {});
    let existing = dir.path().to_str().unwrap();
    assert_eq!(ModelSource::parse(existing).unwrap(), ModelSource::Dir(dir.path().to_path_buf()));
    assert!(
        matches!(ModelSource::parse("missing/model.Q4.gguf").unwrap(), ModelSource::Gguf(_)),
        "a .gguf stays a GGUF path"
    );
    assert_eq!(
        ModelSource::parse("EleutherAI/gpt-neo-125m@v1.0").unwrap(),
        ModelSource::Hub { repo: "EleutherAI/gpt-neo-125m".to_string(), revision: "v1.0".to_string() }
    );
    assert_eq!(
        ModelSource::parse("Qwen/Qwen2.5-0.5B-Instruct").unwrap(),
        ModelSource::Hub { repo: "Qwen/Qwen2.5-0.5B-Instruct".to_string(), revision: "main".to_string() }
    );
    let typo = format!("{existing}-typo");
    for path in [typo.as_str(), "./models/gpt-neo", "../shared/models/none", "~/models/gpt-neo"] {
        let error = ModelSource::parse(path).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, LoadError::BadReference { .. }), "{path}: {message}");
        assert!(
            message.contains(path) && message.contains("read as a path") && message.contains("does not exist"),
            "{path}: {message}"
        );
    }
    for not_an_id in ["gpt2", "owner/name/extra", "owner/", "/name", "owner/name@", "own er/name"] {
        let message = ModelSource::parse(not_an_id).unwrap_err().to_string();
        assert!(
            message.contains(not_an_id) && (message.contains("owner/name") || message.contains("read as a path")),
            "{not_an_id}: {message}"
        );
    }
    // An existing file that is neither a directory nor a .gguf is named as such.
    let file = dir.path().join("config.json");
    let message = ModelSource::parse(file.to_str().unwrap()).unwrap_err().to_string();
    assert!(message.contains("is a file"), "{message}");
}
