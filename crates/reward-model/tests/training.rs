//! A tiny reward model trained from scratch on synthetic comparisons ranks held-out pairs
//! (from test problems only), resumes exactly, and serves as a reward function.

use burn::tensor::Device;
use policy_models::presets::train_tokenizer;
use prompting::Template;
use reward_model::comparisons::build_comparisons;
use reward_model::reward::RewardModelFunction;
use reward_model::train::{RewardTokenizer, RewardTrainer, RewardTrainingConfig, evaluate};
use reward_model::{RobertaConfig, RobertaRegressor};
use rl_algos::rewards::{RewardFunction, RewardInput};
use tasks::synthetic::{SyntheticConfig, generate};

struct Setup {
    tokenizer: RewardTokenizer,
    train: Vec<reward_model::comparisons::Comparison>,
    held_out: Vec<reward_model::comparisons::Comparison>,
    config: RobertaConfig,
}

fn setup() -> Setup {
    let task = generate(&SyntheticConfig {
        train_size: 400,
        test_size: 60,
        max_operations: 2,
        seed: 5,
        ..SyntheticConfig::default()
    })
    .unwrap();
    let template = Template::XmlReasoning;
    let corpus: Vec<String> =
        task.train.problems.iter().map(|p| format!("{}\n{}", p.question, template.response(p))).collect();
    let tokenizer = train_tokenizer(corpus.into_iter(), 160).unwrap();
    let config = RobertaConfig {
        vocab_size: tokenizer.vocab_size(),
        hidden_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 96,
        max_position_embeddings: 160,
        type_vocab_size: 1,
        pad_token_id: tokenizer.pad_id.unwrap(),
        layer_norm_eps: 1e-5,
        hidden_act: "gelu".into(),
        initializer_range: 0.02,
    };
    Setup {
        tokenizer: RewardTokenizer::new(tokenizer, 120),
        train: build_comparisons(&task.train, template, 2, 0),
        held_out: build_comparisons(&task.test, template, 2, 1),
        config,
    }
}

/// burn's initialisation draws from a process-wide generator: tests take turns seeding it.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn seeded_init(config: &RobertaConfig, device: &Device, seed: u64) -> RobertaRegressor {
    let _turn = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    RobertaRegressor::init(config, device)
}

fn training_config(steps: u64) -> RewardTrainingConfig {
    RewardTrainingConfig {
        steps,
        batch_size: 8,
        learning_rate: 1e-3,
        warmup_steps: 10,
        ..RewardTrainingConfig::default()
    }
}

#[test]
fn a_tiny_reward_model_ranks_held_out_pairs() {
    let device = Device::flex().autodiff();
    let setup = setup();
    let mut trainer = RewardTrainer::new(seeded_init(&setup.config, &device, 0), training_config(80));
    let before = evaluate(trainer.model(), &setup.tokenizer, &setup.held_out, 32);
    for _ in 0..80 {
        let step = trainer.train_step(&setup.train, &setup.tokenizer).unwrap();
        if std::env::var_os("COTLAB_DEBUG").is_some() {
            eprintln!("{step:?}");
        }
    }
    let after = evaluate(trainer.model(), &setup.tokenizer, &setup.held_out, 32);
    println!(
        "held-out pairwise accuracy {:.3} -> {:.3}, margin {:.5}",
        before.accuracy, after.accuracy, after.mean_margin
    );
    // A smoke-sized run: well above chance and better than the untrained model. The 90% figure
    // of a full-sized run is measured by the study's reward-model stage, not in the unit tests.
    // What a smoke-sized run reliably learns: broken formats. Wrong answers and corrupted steps
    // need the longer `cargo xtask reward-model` runs (and, for 90%, work still to do).
    let format_pairs: Vec<_> = setup
        .held_out
        .iter()
        .filter(|p| p.corruption == reward_model::comparisons::Corruption::BrokenFormat)
        .cloned()
        .collect();
    let format = evaluate(trainer.model(), &setup.tokenizer, &format_pairs, 32);
    println!("held-out broken-format pairs: {:.3} over {}", format.accuracy, format.pairs);
    assert!(format.accuracy >= 0.9, "broken-format accuracy {:.3}", format.accuracy);
    assert!(after.accuracy >= 0.55, "held-out accuracy {:.3} -> {:.3}", before.accuracy, after.accuracy);
    assert!(after.mean_margin > 0.5, "chosen completions score clearly higher: margin {:.3}", after.mean_margin);

    // As a reward: a correct completion scores above a wrong one for the same question.
    let reward = RewardModelFunction::new(trainer.model(), setup.tokenizer.clone(), 8, false);
    let pair = &setup.held_out[0];
    let scores = reward.score(&[
        RewardInput { prompt: &pair.prompt, completion: &pair.chosen, answer: "", completion_tokens: 0 },
        RewardInput { prompt: &pair.prompt, completion: &pair.rejected, answer: "", completion_tokens: 0 },
    ]);
    assert_eq!(scores.len(), 2);
    assert!(scores.iter().all(|s| s.is_finite()));
    let normalized = RewardModelFunction::new(trainer.model(), setup.tokenizer.clone(), 8, true);
    let values = normalized.score(&[
        RewardInput { prompt: &pair.prompt, completion: &pair.chosen, answer: "", completion_tokens: 0 },
        RewardInput { prompt: &pair.prompt, completion: &pair.rejected, answer: "", completion_tokens: 0 },
    ]);
    assert!((values[0] + values[1]).abs() < 1e-4, "two values standardise to +-a: {values:?}");
}

#[test]
fn reward_model_training_resumes_exactly() {
    let device = Device::flex().autodiff();
    let setup = setup();
    // Without and with the token loss (whose head and its optimizer moments the checkpoint
    // must carry).
    for token_loss_weight in [0.0, 1.0] {
        let dir = tempfile::tempdir().unwrap();
        let config = RewardTrainingConfig { token_loss_weight, ..training_config(6) };
        let init = seeded_init(&setup.config, &device, 1);
        let init = if token_loss_weight > 0.0 { init.with_token_head() } else { init };
        init.save_dir(&dir.path().join("start")).unwrap();
        let start = || RobertaRegressor::load_dir(&dir.path().join("start"), &device).unwrap().0;
        let mut straight = RewardTrainer::new(start(), config.clone());
        for _ in 0..6 {
            straight.train_step(&setup.train, &setup.tokenizer).unwrap();
        }
        let mut first = RewardTrainer::new(start(), config.clone());
        for _ in 0..3 {
            first.train_step(&setup.train, &setup.tokenizer).unwrap();
        }
        first.save_checkpoint(&dir.path().join("checkpoint")).unwrap();
        let mut resumed = RewardTrainer::resume(&dir.path().join("checkpoint"), config.clone(), &device).unwrap();
        assert_eq!(resumed.step(), 3);
        assert_eq!(resumed.model().has_token_head(), token_loss_weight > 0.0);
        for _ in 0..3 {
            resumed.train_step(&setup.train, &setup.tokenizer).unwrap();
        }
        let probe = &setup.held_out[..4];
        let a = evaluate(straight.model(), &setup.tokenizer, probe, 8);
        let b = evaluate(resumed.model(), &setup.tokenizer, probe, 8);
        assert_eq!(a, b, "token loss weight {token_loss_weight}");
    }
}

/// The token labels mark exactly the wrong number, and training with the token loss teaches the
/// token head to flag it: on held-out rejected completions, error tokens get higher logits than
/// the other tokens. The saved model drops the head.
#[test]
fn the_token_loss_teaches_the_head_to_flag_the_error() {
    let device = Device::flex().autodiff();
    let setup = setup();
    let wrong = setup.held_out.iter().filter(|p| p.rejected_error.is_some()).take(24).cloned().collect::<Vec<_>>();
    for pair in &wrong {
        let (ids, labels, _) =
            setup.tokenizer.encode_labelled(&pair.prompt, &pair.rejected, pair.rejected_error.as_ref());
        let flagged: Vec<u32> = ids.iter().zip(&labels).filter(|(_, l)| **l).map(|(id, _)| *id as u32).collect();
        let text = setup.tokenizer.tokenizer().decode(&flagged, false).unwrap();
        assert_eq!(text.trim(), &pair.rejected[pair.rejected_error.clone().unwrap()], "{pair:?}");
    }
    // The head separates error tokens only after a few hundred steps (-3.9 against -3.9 at
    // 200 steps, -3.1 against -4.8 at 600).
    let steps = 600;
    let config = RewardTrainingConfig { token_loss_weight: 1.0, ..training_config(steps) };
    let mut trainer = RewardTrainer::new(seeded_init(&setup.config, &device, 2), config);
    assert!(trainer.model().has_token_head());
    for _ in 0..steps {
        assert!(trainer.train_step(&setup.train, &setup.tokenizer).unwrap().loss.is_finite());
    }
    let texts: Vec<_> =
        wrong.iter().map(|p| (p.prompt.as_str(), p.rejected.as_str(), p.rejected_error.as_ref())).collect();
    let rows = setup.tokenizer.batch_labelled(&texts);
    let model = trainer.model();
    let logits =
        model.token_logits(model.encode(&rows.ids, &rows.mask)).unwrap().into_data().try_to_vec::<f32>().unwrap();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for (i, (label, mask)) in rows.labels.iter().flatten().zip(rows.mask.iter().flatten()).enumerate() {
        if *mask {
            if *label { on.push(logits[i]) } else { off.push(logits[i]) }
        }
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    println!("token logits: error tokens {:.3}, others {:.3}", mean(&on), mean(&off));
    assert!(mean(&on) > mean(&off) + 1.0, "error tokens {:.3}, others {:.3}", mean(&on), mean(&off));
    let dir = tempfile::tempdir().unwrap();
    trainer.into_model().without_token_head().save_dir(dir.path()).unwrap();
    assert!(!RobertaRegressor::load_dir(dir.path(), &Device::flex()).unwrap().0.has_token_head());
}

/// A step's update does not depend on how many threads share its pairs (one shard per thread,
/// gradients summed), with and without the token loss.
#[test]
fn one_thread_and_two_give_the_same_update() {
    let device = Device::flex().autodiff();
    let setup = setup();
    let dir = tempfile::tempdir().unwrap();
    seeded_init(&setup.config, &device, 4).with_token_head().save_dir(dir.path()).unwrap();
    for token_loss_weight in [0.0, 1.0] {
        let scores: Vec<Vec<f32>> = [1, 2]
            .into_iter()
            .map(|threads| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let model = RobertaRegressor::load_dir(dir.path(), &device).unwrap().0;
                let mut trainer =
                    RewardTrainer::new(model, RewardTrainingConfig { token_loss_weight, ..training_config(3) });
                pool.install(|| {
                    (0..3).for_each(|_| {
                        trainer.train_step(&setup.train, &setup.tokenizer).unwrap();
                    })
                });
                let texts: Vec<(&str, &str)> =
                    setup.held_out[..6].iter().map(|p| (p.prompt.as_str(), p.rejected.as_str())).collect();
                let rows = setup.tokenizer.batch(&texts);
                let hidden = trainer.model().encode(&rows.ids, &rows.mask);
                let mut values = trainer.model().score_hidden(hidden.clone()).into_data().try_to_vec::<f32>().unwrap();
                values.extend(trainer.model().token_logits(hidden).unwrap().into_data().try_to_vec::<f32>().unwrap());
                values
            })
            .collect();
        let worst = scores[0].iter().zip(&scores[1]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "token loss weight {token_loss_weight}: worst difference {worst}");
    }
}
