//! Training in bf16 (`TrainDtype::Bf16`): every pass computes on a bf16 copy of f32 master
//! weights. Its gradients are the f32 gradients to bf16's rounding, its learning curve follows
//! the f32 run's, and, unlike a model whose weights are themselves bf16, it keeps small updates.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, FloatDType, Tensor};
use policy_models::optim::{AdamWSettings, Schedule, TrainDtype, parameter_values, sharded_backward};
use policy_models::presets::Preset;
use policy_models::train::{SftConfig, SftExample, SftTrainer, sft_loss_share};
use policy_models::{CausalLm, PolicyTokenizer};

fn data() -> (PolicyTokenizer, Vec<SftExample>) {
    common::arithmetic_sft_data(200, 3)
}

/// burn draws initial weights from the device's shared generator: the tests take turns seeding
/// it, so each starts from the same weights every run.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// SmolLM2's architecture at d = 128, on an autodiff device.
fn llama(tokenizer: &PolicyTokenizer, device: &Device) -> CausalLm {
    let _turn = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(11);
    CausalLm::init(&Preset::TinyLlama.config(tokenizer.vocab_size(), tokenizer.eos_ids[0], 128), device).unwrap()
}

fn config(steps: u64, learning_rate: f64, dtype: TrainDtype) -> SftConfig {
    SftConfig {
        steps,
        batch_size: 16,
        schedule: Schedule { learning_rate, warmup_steps: 0, total_steps: steps, min_lr_ratio: 1.0 },
        adamw: AdamWSettings::default(),
        max_grad_norm: Some(1.0),
        checkpoint_every: 0,
        seed: 0,
        pad_token_id: 1,
        max_tokens_per_micro_batch: policy_models::train::DEFAULT_MAX_TOKENS_PER_MICRO_BATCH,
        dtype,
    }
}

/// Every parameter's values, flattened in visiting order, in f32.
fn flat(model: &CausalLm) -> Vec<f32> {
    parameter_values(model).into_values().flatten().collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>() / (norm(a) * norm(b))
}

fn difference(after: &[f32], before: &[f32]) -> Vec<f32> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

#[test]
fn bf16_passes_give_the_f32_gradients_to_rounding_for_the_f32_parameters() {
    struct Flatten<'a>(&'a GradientsParams, Vec<f32>, Vec<burn::tensor::DType>);
    impl ModuleVisitor for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let grad = self.0.get::<D>(param.id).expect("every parameter has a gradient");
            self.2.push(grad.dtype());
            self.1.extend(grad.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
        }
    }
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let model = llama(&tokenizer, &device);
    let batch: Vec<&SftExample> = examples.iter().take(8).collect();
    let tokens = batch.iter().map(|example| example.target_tokens()).sum::<usize>();
    let gradients = |working: Option<FloatDType>| {
        let (loss, grads, _) = sharded_backward(&model, batch.len(), working, |model, rows| {
            (sft_loss_share(model, &batch[rows], 1, tokens), ())
        })
        .unwrap();
        let mut visitor = Flatten(&grads, Vec::new(), Vec::new());
        model.visit(&mut visitor);
        (loss, visitor.1, visitor.2)
    };
    let (f32_loss, f32_grads, _) = gradients(None);
    let (bf16_loss, bf16_grads, dtypes) = gradients(Some(FloatDType::BF16));
    assert!(
        dtypes.iter().all(|&dtype| dtype == burn::tensor::DType::F32),
        "gradients of f32 parameters are f32: {dtypes:?}"
    );
    assert_eq!(f32_grads.len(), bf16_grads.len());
    let similarity = cosine(&f32_grads, &bf16_grads);
    let ratio = norm(&bf16_grads) / norm(&f32_grads);
    println!("loss f32 {f32_loss:.5} bf16 {bf16_loss:.5}; gradient cosine {similarity:.5}, norm ratio {ratio:.4}");
    assert!((bf16_loss - f32_loss).abs() < 0.02 * f32_loss, "loss f32 {f32_loss} bf16 {bf16_loss}");
    assert!(similarity > 0.99, "gradient cosine similarity {similarity}");
    assert!((ratio - 1.0).abs() < 0.05, "gradient norm ratio {ratio}");
    // The model was only read: its parameters are still the f32 originals.
    assert_eq!(model.compute_dtype(), FloatDType::F32);
}

/// The learning curve: 30 steps at a learning rate that halves the loss, f32 against bf16.
#[test]
fn bf16_training_follows_the_f32_learning_curve() {
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let start = llama(&tokenizer, &device);
    let run = |dtype| {
        let mut trainer = SftTrainer::new(start.clone(), config(30, 3e-3, dtype));
        let history = trainer.run(&examples, None, None, |_| {}).unwrap();
        (history.iter().map(|step| step.loss).collect::<Vec<_>>(), trainer.into_model())
    };
    let (f32_losses, _) = run(TrainDtype::F32);
    let (bf16_losses, trained) = run(TrainDtype::Bf16);
    println!("f32  {:?}", f32_losses.iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>());
    println!("bf16 {:?}", bf16_losses.iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>());
    let tail = |losses: &[f64]| losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    let (f32_end, bf16_end) = (tail(&f32_losses), tail(&bf16_losses));
    assert!(f32_end < 0.6 * f32_losses[0], "the f32 run learns: {f32_losses:?}");
    // Rounding differences grow over 30 steps at this learning rate (as between two f32 runs
    // that sum in another order): the curves agree to a few percent, not to the digit. A bf16
    // run that lost its updates would stay near the first loss.
    assert!(bf16_end < 0.6 * bf16_losses[0], "the bf16 run learns: {bf16_losses:?}");
    assert!(
        (bf16_end - f32_end).abs() < 0.1 * f32_end,
        "last five steps' mean loss: f32 {f32_end:.4}, bf16 {bf16_end:.4}"
    );
    let worst = f32_losses.iter().zip(&bf16_losses).map(|(a, b)| (a - b).abs() / a).fold(0.0, f64::max);
    assert!(worst < 0.15, "largest per-step relative loss difference {worst}");
    assert_eq!(trained.compute_dtype(), FloatDType::F32, "the master weights stay f32");
}

/// At RL's learning rates an AdamW step is far below bf16's resolution: a model whose weights
/// are bf16 leaves most of them where they were, while f32 master weights take every update.
#[test]
fn bf16_training_keeps_updates_that_bf16_weights_lose() {
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let start = llama(&tokenizer, &device);
    // TRL's default GRPO learning rate.
    let change = |model: CausalLm, dtype| {
        let before = flat(&model);
        let mut trainer = SftTrainer::new(model, config(4, 1e-6, dtype));
        trainer.run(&examples, None, None, |_| {}).unwrap();
        difference(&flat(trainer.model()), &before)
    };
    let f32_change = change(start.clone(), TrainDtype::F32);
    let mixed_change = change(start.clone(), TrainDtype::Bf16);
    // (Measured from its own rounded start.)
    let bf16_weights_change = change(start.clone().with_compute_dtype(FloatDType::BF16), TrainDtype::F32);
    let moved = |change: &[f32]| change.iter().filter(|&&x| x != 0.0).count() as f64 / change.len() as f64;
    let (f32_norm, mixed_norm) = (norm(&f32_change), norm(&mixed_change));
    let similarity = cosine(&f32_change, &mixed_change);
    println!(
        "weights moved: f32 {:.4}, bf16 passes on f32 weights {:.4}, bf16 weights {:.4}; update norms f32 {f32_norm:.3e}, mixed {mixed_norm:.3e} (cosine {similarity:.4}), bf16 weights {:.3e} (cosine {:.4})",
        moved(&f32_change),
        moved(&mixed_change),
        moved(&bf16_weights_change),
        norm(&bf16_weights_change),
        cosine(&f32_change, &bf16_weights_change),
    );
    assert!(moved(&f32_change) > 0.99 && moved(&mixed_change) > 0.99, "every trained weight moves");
    assert!(
        (mixed_norm / f32_norm - 1.0).abs() < 0.1,
        "mixed precision's update norm {mixed_norm} vs f32's {f32_norm}"
    );
    assert!(similarity > 0.9, "mixed precision's update points where f32's does: cosine {similarity}");
    let kept = moved(&bf16_weights_change);
    assert!(kept < 0.25, "bf16 weights would leave most weights unmoved, moved {kept}");
}
