//! LoRA adapters in PEFT's layout: cotlab loads adapters PEFT saved and gives PEFT's logits
//! (fixtures from `tools/parity/make_lora_fixtures.py`), and saves its own with PEFT's keys,
//! shapes and scale, so that `(lora_alpha / r) lora_B lora_A` is exactly what the merged
//! checkpoint added to the base.
//!
//! `COTLAB_KEEP_LORA=/tmp/cotlab-lora cargo test -p policy-models --test lora` keeps the saved
//! models for `tools/parity/check_saved_lora.py`, which loads them with PEFT.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Distribution, Tensor};
use common::{fixture, mask};
use policy_models::lora::{ADAPTER_CONFIG_FILE, ADAPTER_SUBDIR, ADAPTER_WEIGHTS_FILE};
use policy_models::{CausalLm, LoraSettings, StepInput};

const RANK: usize = 2;
const ALPHA: f64 = 4.0;

fn settings() -> LoraSettings {
    LoraSettings { rank: RANK, alpha: ALPHA, ..Default::default() }
}

fn fixture_dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Logits of the fixture batch of `base` (the base fixture's inputs).
fn logits(model: &CausalLm, base: &str) -> Vec<f32> {
    let (_, reference) = fixture(base);
    let input = StepInput::from_padded(&reference.input_ids, &mask(&reference));
    model.forward(&input, &mut model.new_cache()).into_data().try_to_vec::<f32>().unwrap()
}

/// Tensors of a safetensors file by key: shape and f32 values.
fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(key, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{key}");
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (key, (view.shape().to_vec(), values))
        })
        .collect()
}

/// Gives every LoRA B factor random values (a fresh adapter's B is zero: no update to check).
struct RandomB(Vec<burn::module::ParamId>);

impl ModuleMapper for RandomB {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.0.contains(&param.id) {
            return param;
        }
        param.map(|tensor| Tensor::random(tensor.shape(), Distribution::Normal(0.0, 0.3), &tensor.device()))
    }
}

fn with_trained_adapters(base: &CausalLm, device: &Device) -> CausalLm {
    device.seed(11);
    let model = base.clone().with_lora(&settings()).unwrap();
    let b_ids = policy_models::optim::parameter_paths(&model)
        .into_iter()
        .filter(|(path, _)| path.ends_with(".lora.b"))
        .map(|(_, id)| id)
        .collect();
    model.map(&mut RandomB(b_ids))
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn adapters_peft_saved_give_peft_logits() {
    let device = Device::flex();
    for base_name in ["gpt_neo", "qwen2_tied"] {
        let lora_dir = fixture_dir(&format!("lora_{base_name}"));
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(lora_dir.join("reference.json")).unwrap()).unwrap();
        let base = CausalLm::load_dir(&fixture_dir(base_name), &device).unwrap();
        let model = base.clone().with_lora(&settings()).unwrap().load_adapters(&lora_dir).unwrap();
        let ours = logits(&model, base_name);
        let peft: Vec<f32> = reference["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap())
            .flat_map(|pos| pos.as_array().unwrap())
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let (_, batch) = fixture(base_name);
        let real: Vec<bool> = batch.attention_mask.iter().flatten().map(|&m| m == 1).collect();
        let vocab = ours.len() / real.len();
        let worst =
            (0..ours.len()).filter(|i| real[i / vocab]).map(|i| (ours[i] - peft[i]).abs()).fold(0.0f32, f32::max);
        println!("{base_name}: PEFT's adapters in cotlab: max |logit difference| {worst:.2e}");
        assert!(worst < 1e-4, "{base_name}: {worst}");
        // The adapters matter, so the comparison above can fail.
        assert!(max_difference(&ours, &logits(&base, base_name)) > 0.1);
        // With the adapters disabled the model is the base, bit for bit.
        let disabled = model.adapters_disabled();
        assert!(disabled.has_adapters() && !base.has_adapters());
        assert_eq!(
            logits(&disabled, base_name),
            logits(&base, base_name),
            "{base_name}: adapters_disabled is not the base"
        );
    }
}

#[test]
fn saved_adapters_have_peft_keys_shapes_and_scale() {
    let device = Device::flex();
    let keep = std::env::var_os("COTLAB_KEEP_LORA").map(std::path::PathBuf::from);
    for (base_name, hf_prefix, modules, width) in [
        (
            "qwen2_tied",
            "model.layers",
            &[
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ][..],
            "hidden_size",
        ),
        (
            "gpt_neo",
            "transformer.h",
            &[
                "attn.attention.q_proj",
                "attn.attention.k_proj",
                "attn.attention.v_proj",
                "attn.attention.out_proj",
                "mlp.c_fc",
                "mlp.c_proj",
            ][..],
            "hidden_size",
        ),
    ] {
        let base = CausalLm::load_dir(&fixture_dir(base_name), &device).unwrap();
        let model = with_trained_adapters(&base, &device);
        let scratch = tempfile::tempdir().unwrap();
        let dir = match &keep {
            Some(keep) => keep.join(format!("lora_{base_name}")),
            None => scratch.path().to_path_buf(),
        };
        model.save_dir(&dir, None).unwrap();
        assert!(
            !dir.join(ADAPTER_CONFIG_FILE).exists(),
            "adapter files beside config.json make transformers apply them twice"
        );
        let adapter = dir.join(ADAPTER_SUBDIR);

        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.join(ADAPTER_CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["task_type"], "CAUSAL_LM");
        assert_eq!(config["r"], RANK);
        assert_eq!(config["lora_alpha"], ALPHA);
        assert_eq!(config["use_rslora"], false);
        assert_eq!(config["bias"], "none");
        let mut targets: Vec<&str> = modules.iter().map(|m| m.rsplit('.').next().unwrap()).collect();
        targets.sort();
        let saved: Vec<&str> =
            config["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(saved, targets);

        let model_config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let layers = model_config.get("num_hidden_layers").or(model_config.get("num_layers")).unwrap().as_u64().unwrap()
            as usize;
        let hidden = model_config[width].as_u64().unwrap() as usize;
        let factors = read_safetensors(&adapter.join(ADAPTER_WEIGHTS_FILE));
        let merged = read_safetensors(&dir.join("model.safetensors"));
        let original = read_safetensors(&fixture_dir(base_name).join("model.safetensors"));
        let mut expected_keys = Vec::new();
        for layer in 0..layers {
            for module in modules {
                let prefix = format!("{hf_prefix}.{layer}.{module}");
                let key = |factor: &str| format!("base_model.model.{prefix}.lora_{factor}.weight");
                expected_keys.extend([key("A"), key("B")]);
                let (a_shape, a) = &factors[&key("A")];
                let (b_shape, b) = &factors[&key("B")];
                let (w_shape, w) = &merged[&format!("{prefix}.weight")];
                let (_, w0) = &original[&format!("{prefix}.weight")];
                let [out, inp] = [w_shape[0], w_shape[1]];
                assert_eq!(a_shape, &vec![RANK, inp], "{prefix}: lora_A is [r, in]");
                assert_eq!(b_shape, &vec![out, RANK], "{prefix}: lora_B is [out, r]");
                if module.ends_with("q_proj") {
                    assert_eq!(inp, hidden);
                }
                // PEFT's update (lora_alpha / r) B A, [out, in], is what merging added to the base.
                let scale = (ALPHA / RANK as f64) as f32;
                let mut worst = 0.0f32;
                let mut size = 0.0f32;
                for o in 0..out {
                    for i in 0..inp {
                        let delta: f32 = (0..RANK).map(|k| b[o * RANK + k] * a[k * inp + i]).sum::<f32>() * scale;
                        worst = worst.max((w[o * inp + i] - w0[o * inp + i] - delta).abs());
                        size = size.max(delta.abs());
                    }
                }
                assert!(
                    worst < 1e-5 && size > 1e-3,
                    "{base_name} {prefix}: merged - base differs from PEFT's update by {worst} (update size {size})"
                );
            }
        }
        expected_keys.sort();
        assert_eq!(factors.keys().cloned().collect::<Vec<_>>(), expected_keys, "{base_name}: adapter keys");

        // Loading the saved adapters onto the base reproduces the trained model, and the merged
        // checkpoint gives the same logits.
        let reloaded = base.clone().with_lora(&settings()).unwrap().load_adapters(&adapter).unwrap();
        let trained = logits(&model, base_name);
        assert_eq!(logits(&reloaded, base_name), trained);
        let merged_model = CausalLm::load_dir(&dir, &device).unwrap();
        assert!(!merged_model.has_adapters());
        let worst = max_difference(&logits(&merged_model, base_name), &trained);
        assert!(worst < 1e-4, "{base_name}: merged checkpoint differs by {worst}");
        if keep.is_some() {
            std::fs::write(dir.join("cotlab_logits.json"), serde_json::to_string(&trained).unwrap()).unwrap();
        }
    }
}

#[test]
fn lora_mistakes_are_errors_that_say_what_to_do() {
    let device = Device::flex();
    let base = CausalLm::load_dir(&fixture_dir("qwen2_tied"), &device).unwrap();
    let error = base.clone().with_lora(&LoraSettings { rank: 0, ..settings() }).unwrap_err();
    assert!(error.contains("lora.rank = 0"), "{error}");
    let error = base.clone().with_lora(&LoraSettings { alpha: -1.0, ..settings() }).unwrap_err();
    assert!(error.contains("lora.alpha"), "{error}");

    let scratch = tempfile::tempdir().unwrap();
    let error = base.save_adapters(scratch.path(), None).unwrap_err().to_string();
    assert!(error.contains("no LoRA adapters"), "{error}");

    // Adapters saved at rank 2 do not load into rank-4 adapters.
    let rank_four = base.clone().with_lora(&LoraSettings { rank: 4, alpha: 8.0, ..Default::default() }).unwrap();
    let error = rank_four.load_adapters(&fixture_dir("lora_qwen2_tied")).unwrap_err().to_string();
    assert!(error.contains("r = 2") && error.contains("rank 4"), "{error}");
    // Nor into a model without adapters.
    let error = base.clone().load_adapters(&fixture_dir("lora_qwen2_tied")).unwrap_err().to_string();
    assert!(error.contains("with_lora"), "{error}");

    // An adapter on the embedding table has no place in PEFT's layout of linear projections.
    let embeddings =
        base.with_lora(&LoraSettings { target_regex: r"(embed_tokens|q_proj)\.weight$".into(), ..settings() }).unwrap();
    let error = embeddings.save_dir(scratch.path(), None).unwrap_err().to_string();
    assert!(error.contains("target_regex"), "{error}");
    assert!(!scratch.path().join("model.safetensors").exists(), "nothing is written before the error");
}
