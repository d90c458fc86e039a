//! Prefix sharing (each prompt run once, its completions attending over its keys and values)
//! gives the full path's log-probs, entropies and parameter gradients on tiny random models:
//! left-padded prompts of different lengths, right-padded completions, rows of one prompt not
//! adjacent, tied and untied heads, LoRA adapters; GPT-Neo takes the full path.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use policy_models::generate::completion_log_probs;
use policy_models::prefix::{SharedPrefixInput, shared_prefix_log_probs};
use policy_models::presets::Preset;
use policy_models::{CausalLm, LoraSettings, ModelConfig, StepInput};

const VOCAB: usize = 300;
const PAD: i64 = 0;

/// burn's parameter initialisation draws from a process-wide generator: tests take turns.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model(preset: Preset, tied: bool, device: &Device) -> CausalLm {
    let _turn = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(11);
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

fn tokens(n: usize, seed: u64) -> Vec<i64> {
    noise(n, seed).into_iter().map(|x| 1 + (x * (VOCAB - 1) as f32) as i64).collect()
}

/// (prompts, prompt of each row, completion ids, completion mask).
type Rows = (Vec<Vec<i64>>, Vec<usize>, Vec<Vec<i64>>, Vec<Vec<bool>>);

/// Three prompts of 5, 2 and 7 tokens; eight rows (prompt 0's rows not adjacent) of 6
/// completion positions, right-padded to lengths 6, 3, 1, 6, 4, 2, 5, 6.
fn rows() -> Rows {
    let prompts = vec![tokens(5, 100), tokens(2, 101), tokens(7, 102)];
    let groups = vec![0, 0, 1, 1, 0, 2, 2, 2];
    let lengths = [6, 3, 1, 6, 4, 2, 5, 6];
    let completion_ids = lengths
        .iter()
        .enumerate()
        .map(|(row, &len)| {
            tokens(6, row as u64).into_iter().enumerate().map(|(i, id)| if i < len { id } else { PAD }).collect()
        })
        .collect();
    let completion_mask = lengths.iter().map(|&len| (0..6).map(|i| i < len).collect()).collect();
    (prompts, groups, completion_ids, completion_mask)
}

fn shared_input() -> SharedPrefixInput {
    let (prompts, groups, completion_ids, completion_mask) = rows();
    let row_prompts: Vec<&[i64]> = groups.iter().map(|&g| prompts[g].as_slice()).collect();
    SharedPrefixInput::new(&row_prompts, &completion_ids, &completion_mask, PAD)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

struct Grads<'a>(&'a GradientsParams, Vec<(ParamId, Vec<f32>)>);

impl ModuleVisitor for Grads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.0.get::<D>(param.id) {
            self.1.push((param.id, host(grad)));
        }
    }
}

/// Log-probs, entropies and parameter gradients of a GRPO-like loss,
/// -Σ mask · exp(logp - logp.detach()) · A_row + 0.1 Σ mask · entropy, by either path.
fn scored(model: &CausalLm, shared: bool) -> (Vec<f32>, Vec<f32>, Vec<(ParamId, Vec<f32>)>) {
    let input = shared_input();
    let (logps, entropies) = if shared {
        shared_prefix_log_probs(model, &input, 0.8)
    } else {
        completion_log_probs(model, &input.full(), input.completion_len(), 0.8)
    };
    let device = logps.device();
    let (rows, width) = (input.rows(), input.completion_len());
    let mask = mask_values();
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows, width]), &device);
    let advantages = Tensor::<2>::from_data(
        TensorData::new(noise(rows, 9).iter().map(|x| x - 0.5).collect::<Vec<_>>(), [rows, 1]),
        &device,
    );
    let ratio = (logps.clone() - logps.clone().detach()).exp();
    let loss = -(ratio * advantages * mask.clone()).sum() + (entropies.clone() * mask).sum() * 0.1;
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let mut visitor = Grads(&grads, Vec::new());
    model.visit(&mut visitor);
    (host(logps), host(entropies), visitor.1)
}

/// The completion mask as 1 and 0, [R Tc].
fn mask_values() -> Vec<f32> {
    let (_, _, _, mask) = rows();
    mask.into_iter().flatten().map(|m| if m { 1.0 } else { 0.0 }).collect()
}

/// max |a - b| / max(max |b|, floor).
fn relative(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

fn compare(name: &str, model: &CausalLm, min_params: usize) {
    let (shared_logps, shared_entropies, shared_grads) = scored(model, true);
    let (logps, entropies, grads) = scored(model, false);
    let mask = mask_values();
    // Every real completion token (padding positions are never read).
    for (i, m) in mask.iter().enumerate() {
        if *m == 1.0 {
            let (a, b) = ((shared_logps[i] - logps[i]).abs(), (shared_entropies[i] - entropies[i]).abs());
            assert!(
                a < 1e-5 && b < 1e-5,
                "{name}: position {i}: log-prob {} vs {}, entropy {} vs {}",
                shared_logps[i],
                logps[i],
                shared_entropies[i],
                entropies[i]
            );
        }
    }
    assert!(
        logps.iter().all(|l| *l < 0.0) && entropies.iter().all(|&h| h > 1.0),
        "{name}: a random model's log-probs and entropies"
    );
    assert_eq!(shared_grads.len(), grads.len(), "{name}: parameters with gradients");
    assert!(grads.len() >= min_params, "{name}: only {} parameters have gradients", grads.len());
    for ((id, a), (other, b)) in shared_grads.iter().zip(&grads) {
        assert_eq!(id, other);
        let error = relative(a, b, 1e-6);
        assert!(error < 1e-4, "{name}: gradient of parameter {id} differs by {error} (relative)");
        assert!(b.iter().any(|v| *v != 0.0), "{name}: a zero gradient tests nothing");
    }
}

#[test]
fn the_input_groups_rows_by_prompt_and_continues_positions_after_each_prompt() {
    let (prompts, groups, completion_ids, completion_mask) = rows();
    let input = shared_input();
    assert_eq!(input.groups, groups);
    assert_eq!((input.prompts.batch_size, input.prompt_len(), input.completion_len()), (3, 7, 6));
    assert!(input.shares_prompts());
    assert_eq!(input.positions(), 3 * 7 + 8 * 6);
    // Row 2 (prompt 1, two tokens, completion of one token): positions 2, then padding's 1.
    assert_eq!(&input.completions.position_ids[2 * 6..3 * 6], &[2, 1, 1, 1, 1, 1]);
    // The full layout is the scoring layout: prompt left-padded to Tp, then the completion.
    let (ids, masks): (Vec<Vec<i64>>, Vec<Vec<bool>>) = groups
        .iter()
        .zip(completion_ids.iter().zip(&completion_mask))
        .map(|(&g, (ids, mask))| {
            let pad = 7 - prompts[g].len();
            let row: Vec<i64> =
                std::iter::repeat_n(PAD, pad).chain(prompts[g].iter().copied()).chain(ids.iter().copied()).collect();
            let keep: Vec<bool> = (0..7).map(|i| i >= pad).chain(mask.iter().copied()).collect();
            (row, keep)
        })
        .unzip();
    let full = StepInput::from_padded(&ids, &masks);
    assert_eq!(input.full(), full);
    // The completions' position ids are the full layout's last six columns.
    for row in 0..8 {
        assert_eq!(
            &input.completions.position_ids[row * 6..(row + 1) * 6],
            &full.position_ids[row * 13 + 7..(row + 1) * 13]
        );
    }
}

#[test]
fn shared_prefix_matches_the_full_path_on_decoders_and_gpt_neo() {
    let device = Device::flex().autodiff();
    for (name, preset, tied) in [
        ("llama (untied head)", Preset::TinyLlama, false),
        ("qwen2 (tied)", Preset::TinyQwen2, true),
        ("gpt_neo (full path)", Preset::TinyGptNeo, true),
    ] {
        let model = model(preset, tied, &device);
        let input = shared_input();
        let takes_shared_path =
            model.shared_prefix_hidden_states(&input.prompts, &input.groups, &input.completions).is_some();
        assert_eq!(takes_shared_path, preset != Preset::TinyGptNeo, "{name}");
        compare(name, &model, 10);
    }
}

#[test]
fn shared_prefix_matches_the_full_path_with_lora() {
    let device = Device::flex().autodiff();
    let settings =
        LoraSettings { rank: 4, alpha: 8.0, target_regex: r"(q_proj|v_proj|down_proj|lm_head)\.weight$".to_string() };
    let model = model(Preset::TinyLlama, false, &device).with_lora(&settings).unwrap().map(&mut Perturb);
    compare("lora", &model, 8);
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

/// Without autodiff (old and reference log-probs), the same numbers.
#[test]
fn shared_prefix_matches_the_full_path_without_autodiff() {
    let device = Device::flex();
    let model = model(Preset::TinyLlama, true, &device);
    let input = shared_input();
    let (shared, _) = shared_prefix_log_probs(&model, &input, 1.0);
    let (full, _) = completion_log_probs(&model, &input.full(), input.completion_len(), 1.0);
    let mask = mask_values();
    let worst = host(shared)
        .iter()
        .zip(host(full))
        .zip(&mask)
        .filter(|(_, m)| **m == 1.0)
        .map(|((a, b), _)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "log-probs differ by {worst}");
}
