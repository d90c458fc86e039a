//! The fused LM head (linear + log-softmax + gather, chunked over rows and vocabulary) gives the
//! unfused path's log-probs, entropies and parameter gradients on tiny random models of each
//! architecture, tied and untied heads, with temperature, a vocabulary that is not a multiple
//! of the vocabulary block, and LoRA adapters.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use policy_models::fused::{HEAD_ROWS, HEAD_VOCAB, head_log_probs, log_softmax_last};
use policy_models::generate::{completion_log_probs, log_probs_from_logits};
use policy_models::presets::Preset;
use policy_models::{CausalLm, LoraSettings, ModelConfig, StepInput};

/// Two vocabulary blocks, the second partial.
const VOCAB: usize = HEAD_VOCAB + 37;

/// burn's parameter initialisation draws from a process-wide generator: tests take turns.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(preset: Preset, tied: bool, device: &Device) -> CausalLm {
    let _turn = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(7);
    let mut config = preset.config(VOCAB, 0, 64);
    if let ModelConfig::Llama(llama) = &mut config {
        llama.tie_word_embeddings = tied;
    }
    CausalLm::init(&config, device).unwrap()
}

/// Deterministic pseudo-random values in [0, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// Three rows of 4 prompt and 6 completion tokens, the first row left-padded by two.
fn input() -> (StepInput, usize) {
    let ids: Vec<Vec<i64>> =
        (0..3).map(|row| noise(10, row).into_iter().map(|x| (x * VOCAB as f32) as i64).collect()).collect();
    let mask: Vec<Vec<bool>> = (0..3).map(|row| (0..10).map(|i| row != 0 || i >= 2).collect()).collect();
    (StepInput::from_padded(&ids, &mask), 6)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// max |a - b| / max(max |b|, floor).
fn relative(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

struct Grads<'a>(&'a GradientsParams, Vec<(ParamId, Vec<f32>)>);

impl ModuleVisitor for Grads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.0.get::<D>(param.id) {
            self.1.push((param.id, host(grad)));
        }
    }
}

/// Log-probs, entropies and every parameter's gradient of
/// Σ advantage_row · logp + 0.3 Σ entropy, through the fused or the unfused head.
fn scored(model: &CausalLm, fused: bool, temperature: f32) -> (Vec<f32>, Vec<f32>, Vec<(ParamId, Vec<f32>)>) {
    let (input, completion_len) = input();
    let (logps, entropies) = if fused {
        completion_log_probs(model, &input, completion_len, temperature)
    } else {
        log_probs_from_logits(model.forward(&input, &mut model.new_cache()), &input, completion_len, temperature)
    };
    let device = logps.device();
    let advantages = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, -0.5, 2.0], [3, 1]), &device);
    let loss = (logps.clone() * advantages).sum() + entropies.clone().sum() * 0.3;
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let mut visitor = Grads(&grads, Vec::new());
    model.visit(&mut visitor);
    (host(logps), host(entropies), visitor.1)
}

fn compare(name: &str, model: &CausalLm, temperature: f32, min_params: usize) {
    let (fused_logps, fused_entropies, fused_grads) = scored(model, true, temperature);
    let (logps, entropies, grads) = scored(model, false, temperature);
    let worst = fused_logps
        .iter()
        .zip(&logps)
        .chain(fused_entropies.iter().zip(&entropies))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 2e-5, "{name} T={temperature}: log-probs/entropies differ by {worst}");
    // A random model's entropy is near ln V: a wrong sign or scale would show.
    assert!(entropies.iter().all(|&h| h > 1.0), "{name}: entropies {entropies:?}");
    assert_eq!(fused_grads.len(), grads.len(), "{name}: parameters with gradients");
    assert!(grads.len() >= min_params, "{name}: only {} parameters have gradients", grads.len());
    for ((id, a), (other, b)) in fused_grads.iter().zip(&grads) {
        assert_eq!(id, other);
        let error = relative(a, b, 1e-6);
        assert!(error < 1e-4, "{name} T={temperature}: gradient of parameter {id} differs by {error} (relative)");
        assert!(b.iter().any(|v| *v != 0.0), "{name}: a zero gradient tests nothing");
    }
}

#[test]
fn fused_head_matches_the_unfused_path_on_every_architecture() {
    let device = Device::flex().autodiff();
    for (name, preset, tied) in [
        ("gpt_neo", Preset::TinyGptNeo, true),
        ("qwen2 (tied)", Preset::TinyQwen2, true),
        ("llama (untied head)", Preset::TinyLlama, false),
    ] {
        let model = model(preset, tied, &device);
        for temperature in [1.0, 0.7] {
            compare(name, &model, temperature, 10);
        }
    }
}

#[test]
fn fused_head_matches_the_unfused_path_with_lora() {
    let device = Device::flex().autodiff();
    // Adapters on the projections (the head frozen: no head gradient is computed), and on an
    // untied head too (its effective weight base + s A B carries the gradient to A and B).
    for (name, tied, regex) in [
        ("lora", true, LoraSettings::default().target_regex),
        ("lora on the head", false, r"(q_proj|lm_head)\.weight$".to_string()),
    ] {
        let settings = LoraSettings { rank: 4, alpha: 8.0, target_regex: regex };
        let model = model(Preset::TinyLlama, tied, &device).with_lora(&settings).unwrap();
        // LoRA's B starts at zero (so A gets no gradient): move it, so that both factors do.
        let model = model.map(&mut Perturb);
        compare(name, &model, 0.8, if tied { 4 * 7 * 2 } else { 4 * 2 + 2 });
    }
}

/// Adds noise to every trainable parameter (LoRA's zero-initialised B included).
struct Perturb;

impl burn::module::ModuleMapper for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.is_require_grad() {
            return param;
        }
        param.map(|t| {
            let (device, shape) = (t.device(), t.shape());
            let n = shape.num_elements();
            let values: Vec<f32> =
                host(t).into_iter().zip(noise(n, n as u64)).map(|(v, r)| v + (r - 0.5) * 0.1).collect();
            Tensor::from_data(TensorData::new(values, shape), &device).require_grad()
        })
    }
}

/// The op itself over several row blocks and a partial vocabulary block, both head layouts,
/// against burn's composed ops: values, and gradients w.r.t. hidden states and head.
#[test]
fn fused_head_op_matches_composed_ops_across_row_and_vocabulary_blocks() {
    let device = Device::flex().autodiff();
    let (rows, depth, vocab, temperature) = (HEAD_ROWS + 5, 8, HEAD_VOCAB + 3, 1.3);
    let hidden = || {
        Tensor::<2>::from_data(
            TensorData::new(noise(rows * depth, 1).iter().map(|x| (x - 0.5) * 4.0).collect::<Vec<_>>(), [rows, depth]),
            &device,
        )
        .require_grad()
    };
    let head = || {
        Tensor::<2>::from_data(
            TensorData::new(noise(depth * vocab, 2).iter().map(|x| x - 0.5).collect::<Vec<_>>(), [depth, vocab]),
            &device,
        )
        .require_grad()
    };
    let ids: Vec<i64> = noise(rows, 3).into_iter().map(|x| (x * vocab as f32) as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [rows]), &device);
    let weights = Tensor::<1>::from_data(
        TensorData::new(noise(rows, 4).iter().map(|x| x - 0.3).collect::<Vec<_>>(), [rows]),
        &device,
    );
    // Reference: full logits.
    let (h, w) = (hidden(), head());
    let log_p = log_softmax_last(h.clone().matmul(w.clone()) / temperature);
    let want_logps = log_p.clone().gather(1, targets.clone().reshape([rows, 1])).reshape([rows]);
    let want_entropies = -(log_p.clone().exp() * log_p).sum_dim(1).reshape([rows]);
    let grads = ((want_logps.clone() * weights.clone()).sum() - want_entropies.clone().sum() * 0.5).backward();
    let (want_dh, want_dw) = (host(h.grad(&grads).unwrap()), host(w.grad(&grads).unwrap()));
    for transposed in [false, true] {
        let (h, w) = (hidden(), head());
        let w_in = if transposed { w.clone().transpose().detach().require_grad() } else { w.clone() };
        let (logps, entropies) = head_log_probs(h.clone(), w_in.clone(), transposed, targets.clone(), temperature);
        let grads = ((logps.clone() * weights.clone()).sum() - entropies.clone().sum() * 0.5).backward();
        assert!(relative(&host(logps), &host(want_logps.clone()), 1.0) < 1e-5, "log-probs (transposed: {transposed})");
        assert!(
            relative(&host(entropies), &host(want_entropies.clone()), 1.0) < 1e-5,
            "entropies (transposed: {transposed})"
        );
        assert!(
            relative(&host(h.grad(&grads).unwrap()), &want_dh, 1e-6) < 1e-4,
            "hidden gradient (transposed: {transposed})"
        );
        let dw = w_in.grad(&grads).unwrap();
        let dw = if transposed { dw.transpose() } else { dw };
        assert!(relative(&host(dw), &want_dw, 1e-6) < 1e-4, "head gradient (transposed: {transposed})");
    }
}

/// A bf16 model takes the fused head through the native bf16 product on a CPU with AVX-512
/// BF16 and the composed fallback elsewhere (blocks of rows through burn's ops in the head's
/// dtype): either way the unfused path's numbers, gradients included.
#[test]
fn bf16_models_take_the_composed_fallback_with_the_same_numbers() {
    let device = Device::flex().autodiff();
    // The cast weights as leaves of their own (the cast is not part of what is differentiated).
    let model =
        model(Preset::TinyQwen2, true, &device).with_compute_dtype(burn::tensor::FloatDType::BF16).map(&mut Leaves);
    let (fused_logps, fused_entropies, fused_grads) = scored(&model, true, 0.9);
    let (logps, entropies, grads) = scored(&model, false, 0.9);
    assert!(
        relative(&fused_logps, &logps, 1.0) < 1e-3 && relative(&fused_entropies, &entropies, 1.0) < 1e-3,
        "{fused_logps:?} vs {logps:?}"
    );
    assert_eq!(fused_grads.len(), grads.len());
    for ((_, a), (_, b)) in fused_grads.iter().zip(&grads) {
        assert!(relative(a, b, 1e-6) < 2e-2, "bf16 gradient differs by {}", relative(a, b, 1e-6));
    }
}

/// Makes every parameter a fresh autodiff leaf.
struct Leaves;

impl burn::module::ModuleMapper for Leaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| t.detach().require_grad())
    }
}
