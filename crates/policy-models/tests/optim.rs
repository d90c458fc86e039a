//! AdamW, global-norm clipping and the warmup-cosine schedule against PyTorch and transformers
//! (fixture made by `tools/parity/make_optim_fixtures.py`), within 1e-6. AdamW's parameter groups
//! are transformers' Trainer's: weight decay on `weight` only, none on the bias and norm weights.

use std::path::PathBuf;

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use policy_models::optim::{
    AdamW, AdamWSettings, Schedule, clip_grad_norm, decays, no_decay_parameters, parameter_paths,
};

#[derive(Module, Debug)]
struct Toy {
    weight: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
    ln: LayerNorm,
    final_norm: RmsNorm,
}

impl Toy {
    /// The 1-D parameters by their fixture names.
    fn vectors(&self) -> [(&'static str, &Param<Tensor<1>>); 4] {
        [
            ("bias", &self.bias),
            ("ln.gamma", &self.ln.gamma),
            ("ln.beta", self.ln.beta.as_ref().unwrap()),
            ("final_norm.gamma", &self.final_norm.gamma),
        ]
    }
}

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    match value {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

fn toy(fixture: &serde_json::Value, device: &Device) -> Toy {
    let values = |name: &str| floats(&fixture["initial"][name]);
    toy_from(values("weight"), |name| values(name), device)
}

/// A toy with fresh parameter ids holding `weight` and the 1-D values `vector(name)`.
fn toy_from(weight: Vec<f32>, vector: impl Fn(&str) -> Vec<f32>, device: &Device) -> Toy {
    let param = |name: &str| {
        Param::from_tensor(Tensor::<1>::from_data(TensorData::new(vector(name), [4]), device).require_grad())
    };
    let mut ln = LayerNormConfig::new(4).init(device);
    ln.gamma = param("ln.gamma");
    ln.beta = Some(param("ln.beta"));
    let mut final_norm = RmsNormConfig::new(4).init(device);
    final_norm.gamma = param("final_norm.gamma");
    Toy {
        weight: Param::from_tensor(Tensor::from_data(TensorData::new(weight, [3, 4]), device).require_grad()),
        bias: param("bias"),
        ln,
        final_norm,
    }
}

fn grads(toy: &Toy, value: &serde_json::Value, scale: f32, device: &Device) -> GradientsParams {
    let mut grads = GradientsParams::new();
    grads.register(
        toy.weight.id,
        Tensor::<2>::from_data(TensorData::new(floats(&value["weight"]), [3, 4]), device) * scale,
    );
    for (name, param) in toy.vectors() {
        if let Some(values) = value.get(name) {
            grads.register(param.id, Tensor::<1>::from_data(TensorData::new(floats(values), [4]), device) * scale);
        }
    }
    grads
}

fn assert_close(ours: Vec<f32>, expected: Vec<f32>, what: &str) {
    assert_eq!(ours.len(), expected.len());
    for (a, b) in ours.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-6, "{what}: {a} vs {b}");
    }
}

#[test]
fn adamw_matches_torch_optim_adamw() {
    let fixture = fixture();
    let device = Device::flex().autodiff();
    let inner = device.clone().without_autodiff();
    let settings: AdamWSettings = serde_json::from_value(fixture["adamw_settings"].clone()).unwrap();
    let mut optimizer = AdamW::new(settings);
    let mut model = toy(&fixture, &device);
    for (step, expected) in fixture["adamw_steps"].as_array().unwrap().iter().enumerate() {
        let lr = fixture["learning_rates"][step].as_f64().unwrap();
        let grads = grads(&model, &fixture["grads"][step], 1.0, &inner);
        let (updated, update_norm) = optimizer.step(model, grads, lr);
        model = updated;
        assert!(update_norm > 0.0);
        assert_close(
            model.weight.val().into_data().try_to_vec().unwrap(),
            floats(&expected["weight"]),
            &format!("weight, step {step}"),
        );
        for (name, param) in model.vectors() {
            assert_close(
                param.val().into_data().try_to_vec().unwrap(),
                floats(&expected[name]),
                &format!("{name}, step {step}"),
            );
        }
        assert!(model.weight.val().is_require_grad(), "parameters stay trainable");
    }
}

#[test]
fn adamw_state_saves_and_restores_by_parameter_path() {
    let fixture = fixture();
    let device = Device::flex().autodiff();
    let inner = device.clone().without_autodiff();
    let settings: AdamWSettings = serde_json::from_value(fixture["adamw_settings"].clone()).unwrap();
    let run = |interrupt: bool| {
        let mut optimizer = AdamW::new(settings);
        let mut model = toy(&fixture, &device);
        let dir = tempfile::tempdir().unwrap();
        for step in 0..5 {
            if interrupt && step == 2 {
                // Save, then continue from a fresh model with new parameter ids and the loaded state.
                optimizer.save(&model, &dir.path().join("optimizer.safetensors")).unwrap();
                let weight = model.weight.val().into_data().try_to_vec::<f32>().unwrap();
                let vectors: Vec<(&str, Vec<f32>)> = model
                    .vectors()
                    .iter()
                    .map(|(name, p)| (*name, p.val().into_data().try_to_vec::<f32>().unwrap()))
                    .collect();
                let vector = |name: &str| vectors.iter().find(|(n, _)| *n == name).unwrap().1.clone();
                model = toy_from(weight, vector, &device);
                optimizer = AdamW::load(settings, &model, &dir.path().join("optimizer.safetensors")).unwrap();
                assert_eq!(optimizer.steps(), 2);
            }
            let grads = grads(&model, &fixture["grads"][step], 1.0, &inner);
            model = optimizer.step(model, grads, 0.01).0;
        }
        model.weight.val().into_data().try_to_vec::<f32>().unwrap()
    };
    assert_eq!(run(false), run(true));
}

#[test]
fn clipping_uses_the_global_norm_as_torch() {
    let fixture = fixture();
    let device = Device::flex().autodiff();
    let model = toy(&fixture, &device);
    let clip = &fixture["clip"];
    let mut grads =
        grads(&model, &fixture["grads"][0], clip["scale"].as_f64().unwrap() as f32, &device.clone().without_autodiff());
    let norm = clip_grad_norm(&model, &mut grads, clip["max_norm"].as_f64().unwrap());
    assert!((norm - clip["total_norm"].as_f64().unwrap()).abs() < 1e-4, "{norm}");
    assert_close(
        grads.get::<2>(model.weight.id).unwrap().into_data().try_to_vec().unwrap(),
        floats(&clip["weight"]),
        "clipped weight grad",
    );
    assert_close(
        grads.get::<1>(model.bias.id).unwrap().into_data().try_to_vec().unwrap(),
        floats(&clip["bias"]),
        "clipped bias grad",
    );
}

#[test]
fn schedule_matches_transformers_cosine_with_warmup() {
    let fixture = fixture();
    let spec = &fixture["schedule"];
    let schedule = Schedule {
        learning_rate: spec["learning_rate"].as_f64().unwrap(),
        warmup_steps: spec["warmup_steps"].as_u64().unwrap(),
        total_steps: spec["total_steps"].as_u64().unwrap(),
        min_lr_ratio: 0.0,
    };
    // Steps 0..=total; past the end transformers' cosine rises again, cotlab's stays at the floor.
    for (step, expected) in spec["rates"].as_array().unwrap().iter().enumerate().take(11) {
        let ours = schedule.learning_rate_at(step as u64);
        assert!((ours - expected.as_f64().unwrap()).abs() < 1e-12, "step {step}: {ours} vs {expected}");
    }
    assert_eq!(schedule.learning_rate_at(11), 0.0);
}

#[test]
fn weight_decay_leaves_out_biases_and_norm_weights_as_transformers_trainer() {
    let fixture = fixture();
    let model = toy(&fixture, &Device::flex().autodiff());
    let no_decay = no_decay_parameters(&model);
    let decayed: Vec<String> =
        parameter_paths(&model).into_iter().filter(|(_, id)| !no_decay.contains(id)).map(|(path, _)| path).collect();
    let expected: Vec<String> = serde_json::from_value(fixture["decay_parameters"].clone()).unwrap();
    assert_eq!(decayed, expected);
    // The models' own names: GPT-Neo's LayerNorms by type, Llama / Qwen2 RMSNorms by type and name.
    assert!(decays("body.GptNeo.blocks.0.attn_q.weight", "Struct:Linear"));
    assert!(!decays("body.GptNeo.blocks.0.attn_q.bias", "Struct:Linear"));
    assert!(!decays("body.GptNeo.blocks.0.ln_1.gamma", "Struct:LayerNorm"));
    assert!(!decays("body.Decoder.blocks.3.input_layernorm.gamma", "Struct:RmsNorm"));
    assert!(!decays("body.Decoder.norm.gamma", "Struct:Other"));
    assert!(!decays("model.q_norm.weight", "Struct:Other"));
    assert!(decays("value_head.weight", "Struct:Linear"));
    assert_eq!(AdamWSettings::default().weight_decay, 0.0, "transformers' TrainingArguments default");
}

/// On the real architectures, decay leaves out exactly the biases and the norm weights.
#[test]
fn the_models_decay_their_weights_but_not_biases_or_norms() {
    use policy_models::CausalLm;
    use policy_models::presets::Preset;
    let device = Device::flex();
    for preset in [Preset::TinyGptNeo, Preset::TinyQwen2, Preset::TinyLlama] {
        let model = CausalLm::init(&preset.config(300, 0, 64), &device).unwrap();
        let no_decay = no_decay_parameters(&model);
        let paths = parameter_paths(&model);
        let left_out: Vec<&str> =
            paths.iter().filter(|(_, id)| no_decay.contains(id)).map(|(path, _)| path.as_str()).collect();
        let is_norm_or_bias = |path: &str| {
            path.ends_with(".bias")
                || ["ln_1.", "ln_2.", "ln_f.", "layernorm.", ".norm."].iter().any(|part| path.contains(part))
        };
        assert!(!left_out.is_empty(), "{preset:?}: norms present");
        for (path, id) in &paths {
            assert_eq!(no_decay.contains(id), is_norm_or_bias(path), "{preset:?}: {path}");
        }
    }
}
