//! Supervised training on synthetic arithmetic: the loss falls, and a run interrupted at a
//! checkpoint and resumed ends with exactly the weights of an uninterrupted run.

mod common;

use burn::tensor::Device;
use policy_models::gpt_neo::{AttentionKind, GptNeoConfig};
use policy_models::optim::{AdamWSettings, Schedule};
use policy_models::train::{SftConfig, SftExample, SftTrainer};
use policy_models::{CausalLm, ModelConfig, PolicyTokenizer, StepInput};

fn data() -> (PolicyTokenizer, Vec<SftExample>) {
    common::arithmetic_sft_data(300, 1)
}

fn small_model(vocab_size: usize, device: &Device) -> CausalLm {
    let config = ModelConfig::GptNeo(GptNeoConfig {
        vocab_size,
        max_position_embeddings: 128,
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        intermediate_size: None,
        attention_types: vec![(vec![AttentionKind::Global, AttentionKind::Local], 1)],
        window_size: 32,
        activation_function: "gelu_new".into(),
        layer_norm_epsilon: 1e-5,
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        initializer_range: 0.02,
    });
    CausalLm::init(&config, device).unwrap()
}

fn config(steps: u64) -> SftConfig {
    SftConfig {
        steps,
        batch_size: 16,
        schedule: Schedule { learning_rate: 3e-3, warmup_steps: 5, total_steps: steps, min_lr_ratio: 0.1 },
        adamw: AdamWSettings::default(),
        max_grad_norm: Some(1.0),
        checkpoint_every: 3,
        seed: 0,
        pad_token_id: 1,
        max_tokens_per_micro_batch: policy_models::train::DEFAULT_MAX_TOKENS_PER_MICRO_BATCH,
        dtype: Default::default(),
    }
}

#[test]
fn supervised_training_lowers_the_loss() {
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let mut trainer = SftTrainer::new(small_model(tokenizer.vocab_size(), &device), config(40));
    let history = trainer.run(&examples, None, None, |_| {}).unwrap();
    let first = history[..3].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    let last = history[history.len() - 3..].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    println!("loss {first:.3} -> {last:.3}");
    assert!(last < 0.5 * first, "loss {first:.3} -> {last:.3}");
    assert!(history.iter().all(|s| s.grad_norm.is_finite() && s.tokens > 0));
    // Warmup starts at a learning rate of 0 (as transformers' schedule): the first step changes nothing.
    assert_eq!(history[0].update_norm, 0.0);
    assert!(history[1..].iter().all(|s| s.update_norm > 0.0));
    assert_eq!(history.last().unwrap().step, 40);
}

#[test]
fn resuming_from_a_checkpoint_reproduces_the_uninterrupted_run() {
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let initial = small_model(tokenizer.vocab_size(), &device);
    let dir = tempfile::tempdir().unwrap();
    initial.save_dir(&dir.path().join("initial"), None).unwrap();

    // Uninterrupted: 6 steps.
    let start = CausalLm::load_dir(&dir.path().join("initial"), &device).unwrap();
    let mut straight = SftTrainer::new(start, config(6));
    straight.run(&examples, None, None, |_| {}).unwrap();

    // Interrupted after the checkpoint at step 3, then resumed.
    let start = CausalLm::load_dir(&dir.path().join("initial"), &device).unwrap();
    let checkpoints = dir.path().join("run");
    let mut first_half = SftTrainer::new(start, config(6));
    for _ in 0..4 {
        let step = first_half.train_step(&examples).unwrap();
        if step.step == 3 {
            first_half.save_checkpoint(&checkpoints, Some(&tokenizer)).unwrap();
        }
    }
    drop(first_half); // the crash: step 4 is lost
    let latest = SftTrainer::latest_checkpoint(&checkpoints).unwrap();
    assert!(latest.ends_with("checkpoint-3"));
    let mut resumed = SftTrainer::resume(&latest, config(6), &device).unwrap();
    assert_eq!(resumed.step(), 3);
    resumed.run(&examples, Some(&checkpoints), Some(&tokenizer), |_| {}).unwrap();

    let probe = StepInput::from_padded(&[examples[0].prompt_ids.clone()], &[vec![true; examples[0].prompt_ids.len()]]);
    let a =
        straight.model().forward(&probe, &mut straight.model().new_cache()).into_data().try_to_vec::<f32>().unwrap();
    let b = resumed.model().forward(&probe, &mut resumed.model().new_cache()).into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(a, b, "resumed weights differ from the uninterrupted run");
    assert!(SftTrainer::latest_checkpoint(&checkpoints).unwrap().ends_with("checkpoint-6"));
}

#[test]
fn lora_trains_only_adapters_and_saves_merged_weights() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct Trainable(usize, usize);
    impl ModuleVisitor for Trainable {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let count = param.val().dims().iter().product::<usize>();
            if param.val().is_require_grad() {
                self.0 += count;
            } else {
                self.1 += count;
            }
        }
    }
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let base = small_model(tokenizer.vocab_size(), &device);
    let probe = StepInput::from_padded(&[examples[0].prompt_ids.clone()], &[vec![true; examples[0].prompt_ids.len()]]);
    let before = base.forward(&probe, &mut base.new_cache()).into_data().try_to_vec::<f32>().unwrap();
    let settings = policy_models::LoraSettings { rank: 4, alpha: 8.0, ..Default::default() };
    let model = base.with_lora(&settings).unwrap();
    let mut counts = Trainable(0, 0);
    model.visit(&mut counts);
    assert!(counts.0 > 0 && counts.0 * 5 < counts.1, "trainable {} vs frozen {}", counts.0, counts.1);
    // B starts at zero: adapters change nothing until trained.
    let with_adapters = model.forward(&probe, &mut model.new_cache()).into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(before, with_adapters);
    let mut trainer = SftTrainer::new(model, config(15));
    let history = trainer.run(&examples, None, None, |_| {}).unwrap();
    assert!(history.last().unwrap().loss < history[0].loss, "LoRA training lowers the loss");
    let trained = trainer.into_model();
    let after = trained.forward(&probe, &mut trained.new_cache()).into_data().try_to_vec::<f32>().unwrap();
    assert_ne!(after, before);
    let dir = tempfile::tempdir().unwrap();
    trained.save_dir(dir.path(), None).unwrap();
    let merged = CausalLm::load_dir(dir.path(), &device).unwrap();
    let reloaded = merged.forward(&probe, &mut merged.new_cache()).into_data().try_to_vec::<f32>().unwrap();
    let worst = after.iter().zip(&reloaded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "merged checkpoint differs by {worst}");
}

/// A LoRA run resumes as the frozen base with the checkpoint's adapters and optimizer state,
/// and ends where the uninterrupted run does; the plain resume refuses its merged weights.
#[test]
fn a_lora_run_resumes_exactly_from_its_adapters() {
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let dir = tempfile::tempdir().unwrap();
    small_model(tokenizer.vocab_size(), &device).save_dir(&dir.path().join("initial"), None).unwrap();
    let settings = policy_models::LoraSettings { rank: 2, alpha: 4.0, ..Default::default() };
    // The adapters' random A is drawn once and reloaded: the generator is shared with tests
    // running in parallel.
    let base = || CausalLm::load_dir(&dir.path().join("initial"), &device).unwrap();
    base().with_lora(&settings).unwrap().save_adapters(&dir.path().join("initial_adapter"), None).unwrap();
    let start = || base().with_lora(&settings).unwrap().load_adapters(&dir.path().join("initial_adapter")).unwrap();
    let mut straight = SftTrainer::new(start(), config(4));
    straight.run(&examples, None, None, |_| {}).unwrap();
    let mut first_half = SftTrainer::new(start(), config(4));
    first_half.train_step(&examples).unwrap();
    first_half.train_step(&examples).unwrap();
    let checkpoint = first_half.save_checkpoint(&dir.path().join("run"), None).unwrap();
    drop(first_half);
    let error = SftTrainer::resume(&checkpoint, config(4), &device)
        .err()
        .expect("merged weights do not resume a LoRA run")
        .to_string();
    assert!(error.contains("resume_lora"), "{error}");
    let mut resumed = SftTrainer::resume_lora(start(), &checkpoint, config(4)).unwrap();
    assert_eq!(resumed.step(), 2);
    resumed.run(&examples, None, None, |_| {}).unwrap();
    let probe = StepInput::from_padded(&[examples[0].prompt_ids.clone()], &[vec![true; examples[0].prompt_ids.len()]]);
    let logits =
        |model: &CausalLm| model.forward(&probe, &mut model.new_cache()).into_data().try_to_vec::<f32>().unwrap();
    assert!(resumed.model().has_adapters());
    assert_eq!(logits(straight.model()), logits(resumed.model()), "the resumed LoRA run differs");
}

/// Data parallelism over rows changes nothing but the speed: the gradients of a batch split
/// into one shard per thread (each with its own autodiff graph) equal the whole batch's.
#[test]
fn sharded_gradients_equal_the_whole_batch_gradients() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use policy_models::optim::{shard_ranges, sharded_backward};
    use policy_models::train::{sft_loss, sft_loss_share};

    struct Flatten<'a>(&'a GradientsParams, Vec<f32>);
    impl ModuleVisitor for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<burn::tensor::Tensor<D>>) {
            let grad = self.0.get::<D>(param.id).expect("every parameter has a gradient");
            self.1.extend(grad.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
        }
    }
    let flatten = |model: &CausalLm, grads: &GradientsParams| {
        let mut visitor = Flatten(grads, Vec::new());
        model.visit(&mut visitor);
        visitor.1
    };

    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    // Rows of different lengths, so each shard pads differently from the whole batch.
    let batch: Vec<&SftExample> = examples.iter().take(6).collect();
    let model = small_model(tokenizer.vocab_size(), &device);
    let (loss, tokens) = sft_loss(&model, &batch, 1);
    let whole_loss = f64::from(loss.clone().into_scalar::<f32>());
    let whole = flatten(&model, &GradientsParams::from_grads(loss.backward(), &model));

    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let (sharded_loss, sharded, shards) = pool.install(|| {
        let (loss, grads, shards) = sharded_backward(&model, batch.len(), None, |model, rows| {
            let count = rows.len();
            (sft_loss_share(model, &batch[rows], 1, tokens), count)
        })
        .unwrap();
        assert_eq!(shard_ranges(&model, batch.len()).len(), 3);
        (loss, flatten(&model, &grads), shards)
    });
    assert_eq!(shards, vec![2, 2, 2], "one shard per thread, in row order");
    assert!((sharded_loss - whole_loss).abs() < 1e-5 * whole_loss.abs(), "{sharded_loss} vs {whole_loss}");
    assert_eq!(whole.len(), sharded.len());
    let scale = whole.iter().fold(0f32, |m, g| m.max(g.abs()));
    let worst = whole.iter().zip(&sharded).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        scale > 0.0 && worst < 1e-5 * scale.max(1.0),
        "largest gradient difference {worst} (largest gradient {scale})"
    );
}

/// A batch over the token budget is split into micro-batches whose gradients add up to the
/// one-pass step's: same loss, same gradient norm, same weights after the step (to float
/// summation order). The loss is also the plain log-softmax cross-entropy over full logits,
/// which the fused head replaces.
#[test]
fn micro_batches_under_the_token_budget_take_the_one_pass_step() {
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let dir = tempfile::tempdir().unwrap();
    small_model(tokenizer.vocab_size(), &device).save_dir(dir.path(), None).unwrap();
    let start = || CausalLm::load_dir(dir.path(), &device).unwrap();
    let padded = examples[..16].iter().map(|e| e.prompt_ids.len() + e.completion_ids.len()).max().unwrap();
    let step = |budget: usize| {
        let mut trainer = SftTrainer::new(start(), SftConfig { max_tokens_per_micro_batch: budget, ..config(6) });
        // Past the warmup's zero learning rate, so that the step moves the weights.
        let steps: Vec<_> = (0..2).map(|_| trainer.train_step(&examples).unwrap()).collect();
        let probe =
            StepInput::from_padded(&[examples[0].prompt_ids.clone()], &[vec![true; examples[0].prompt_ids.len()]]);
        let logits = trainer.model().forward(&probe, &mut trainer.model().new_cache());
        (steps, logits.into_data().try_to_vec::<f32>().unwrap())
    };
    let (whole, whole_logits) = step(usize::MAX);
    // At most 5 rows per micro-batch: 16 rows become 4 micro-batches of 4.
    let (split, split_logits) = step(5 * padded);
    for (a, b) in whole.iter().zip(&split) {
        assert!((a.loss - b.loss).abs() < 1e-5 * a.loss, "loss {} vs {}", a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm, "grad norm {} vs {}", a.grad_norm, b.grad_norm);
    }
    let worst = whole_logits.iter().zip(&split_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "weights after the split step differ: logits by {worst}");
    assert!(whole[1].update_norm > 0.0);

    // The first step's loss against the unfused cross-entropy of the same batch.
    let model = start();
    let batch: Vec<&SftExample> = {
        // The first step's batch: the first 16 positions of the seed-0 permutation.
        let mut order: Vec<usize> = (0..examples.len()).collect();
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        order[..16].iter().map(|&i| &examples[i]).collect()
    };
    let (mut total, mut count) = (0.0f64, 0usize);
    for example in &batch {
        let ids: Vec<i64> = example.prompt_ids.iter().chain(&example.completion_ids).copied().collect();
        let input = StepInput::from_padded(std::slice::from_ref(&ids), &[vec![true; ids.len()]]);
        let logits = model.forward(&input, &mut model.new_cache()).into_data().try_to_vec::<f32>().unwrap();
        let vocab = logits.len() / ids.len();
        for t in example.prompt_ids.len().max(1) - 1..ids.len() - 1 {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_sum = row.iter().map(|&z| f64::from(z - max).exp()).sum::<f64>().ln() + f64::from(max);
            total += log_sum - f64::from(row[ids[t + 1] as usize]);
            count += 1;
        }
    }
    let expected = total / count as f64;
    assert!((whole[0].loss - expected).abs() < 1e-4 * expected, "loss {} vs unfused {expected}", whole[0].loss);
}

/// The fused-head loss has the gradients of the plain one (full logits, log-softmax, gather,
/// masked mean) for every parameter, on packed rows of one prompt token as the study's
/// supervised base trains them, padding included.
#[test]
fn the_fused_sft_loss_has_the_unfused_gradients() {
    use burn::module::{Module, ModuleVisitor, Param, ParamId};
    use burn::optim::GradientsParams;
    use burn::tensor::{Int, Tensor, TensorData};
    struct Grads<'a>(&'a GradientsParams, Vec<(ParamId, Vec<f32>)>);
    impl ModuleVisitor for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.0.get::<D>(param.id) {
                self.1.push((param.id, grad.into_data().try_to_vec::<f32>().unwrap()));
            }
        }
    }
    let device = Device::flex().autodiff();
    let (tokenizer, examples) = data();
    let model = small_model(tokenizer.vocab_size(), &device);
    let packed: Vec<SftExample> = examples[..6]
        .iter()
        .map(|e| {
            let ids: Vec<i64> = e.prompt_ids.iter().chain(&e.completion_ids).copied().collect();
            SftExample { prompt_ids: ids[..1].to_vec(), completion_ids: ids[1..].to_vec() }
        })
        .collect();
    let batch: Vec<&SftExample> = packed.iter().collect();
    let grads_of = |loss: Tensor<1>| {
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let mut visitor = Grads(&grads, Vec::new());
        model.visit(&mut visitor);
        visitor.1
    };
    let (fused_loss, tokens) = policy_models::train::sft_loss(&model, &batch, 1);
    let fused_value = fused_loss.clone().into_scalar::<f32>();
    let fused = grads_of(fused_loss);

    // The plain loss, left-padded as `sft_loss` pads.
    let length = batch.iter().map(|e| e.prompt_ids.len() + e.completion_ids.len()).max().unwrap();
    let (mut ids, mut mask, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in &batch {
        let real = e.prompt_ids.len() + e.completion_ids.len();
        let row: Vec<i64> = std::iter::repeat_n(1, length - real)
            .chain(e.prompt_ids.iter().chain(&e.completion_ids).copied())
            .collect();
        for t in 0..length {
            let trained = t + 1 < length && t + 1 >= length - e.completion_ids.len() && t + real >= length;
            targets.push(if t + 1 < length { row[t + 1] } else { 1 });
            weights.push(if trained { 1.0f32 } else { 0.0 });
        }
        mask.push((0..length).map(|t| t >= length - real).collect::<Vec<bool>>());
        ids.push(row);
    }
    let logits = model.forward(&StepInput::from_padded(&ids, &mask), &mut model.new_cache());
    let rows = batch.len();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [rows, length, 1]), &device);
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [rows, length]), &device);
    let log_probs = burn::tensor::activation::log_softmax(logits, 2).gather(2, targets).reshape([rows, length]);
    let plain_loss = -(log_probs * weights).sum() / tokens as f32;
    let plain_value = plain_loss.clone().into_scalar::<f32>();
    let plain = grads_of(plain_loss);
    assert!((fused_value - plain_value).abs() < 1e-5 * plain_value, "loss {fused_value} vs {plain_value}");
    assert_eq!(fused.len(), plain.len(), "parameters with gradients");
    for ((id, a), (_, b)) in fused.iter().zip(&plain) {
        let scale = b.iter().map(|v| v.abs()).fold(1e-6f32, f32::max);
        let worst = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max) / scale;
        assert!(worst < 1e-4, "gradient of {id} differs by {worst} (relative to its largest entry)");
    }
}
