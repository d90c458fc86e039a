//! The likelihood verifier ([`LikelihoodRewardModel`]): its score against the mean completion
//! log-probability computed from transformers' logits (policy-models' tiny fixtures, made by
//! `tools/parity/make_fixtures.py`), the rows it reads on real tokenizers, saving and reloading,
//! learning a toy set with Bradley-Terry (full and LoRA), and an exact resume.

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::Device;
use policy_models::presets::train_tokenizer;
use policy_models::{CausalLm, LoraSettings, ModelConfig, PolicyTokenizer};
use prompting::Template;
use reward_model::comparisons::{Comparison, Corruption, build_comparisons};
use reward_model::train::{PairwiseLoss, RewardTokenizer, RewardTrainer, RewardTrainingConfig, evaluate};
use reward_model::{LikelihoodRewardModel, RewardModel, RewardRows, RowLayout};
use tasks::synthetic::{SyntheticConfig, generate};

fn policy_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy-models/tests/fixtures").join(name)
}

fn shared_tokenizer(name: &str) -> PolicyTokenizer {
    let root = std::env::var_os("COTLAB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    PolicyTokenizer::load_dir(&root.join("tokenizers").join(name)).unwrap()
}

/// log softmax(logits)[target] in f64.
fn log_prob(logits: &[f64], target: usize) -> f64 {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    logits[target] - max - total.ln()
}

#[test]
fn scores_are_beta_times_transformers_mean_completion_log_prob() {
    let device = Device::flex();
    for name in ["llama3", "qwen2_tied", "gpt_neo"] {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(policy_fixture(name).join("reference.json")).unwrap())
                .unwrap();
        let ids: Vec<Vec<i64>> = serde_json::from_value(json["input_ids"].clone()).unwrap();
        let mask: Vec<Vec<i64>> = serde_json::from_value(json["attention_mask"].clone()).unwrap();
        let logits: Vec<Vec<Vec<f64>>> = serde_json::from_value(json["logits"].clone()).unwrap();
        // Row 0 is unpadded; row 1 is left-padded there (positions restart at its first real
        // token), so its real tokens, right-padded here, read the same logits.
        let offset = mask[1].iter().position(|&m| m == 1).unwrap();
        let real = ids[1][offset..].to_vec();
        let width = ids[0].len();
        let rows = RewardRows {
            ids: vec![ids[0].clone(), [real.clone(), vec![0; offset]].concat(), ids[0].clone()],
            mask: vec![vec![true; width], (0..width).map(|t| t < real.len()).collect(), vec![true; width]],
            // The third row's completion is empty.
            completion_start: vec![5, 3, width],
            labels: vec![vec![false; width]; 3],
        };
        let expected = |row: usize, start: usize, end: usize, shift: usize| {
            let ids = &ids[row];
            let sum: f64 = (start + shift..end + shift).map(|t| log_prob(&logits[row][t - 1], ids[t] as usize)).sum();
            sum / (end - start) as f64
        };
        let vocab = logits[0][0].len() as f64;
        let beta = 2.5;
        let expected = [expected(0, 5, width, 0), expected(1, 3, real.len(), offset), -vocab.ln()].map(|e| e * beta);
        let model = LikelihoodRewardModel::load_dir(&policy_fixture(name), Some(beta as f32), &device).unwrap();
        assert_eq!(model.layout(), RowLayout::Continuation);
        let scores = model.score_rows(&rows).into_data().try_to_vec::<f32>().unwrap();
        for (row, (ours, theirs)) in scores.iter().zip(expected).enumerate() {
            assert!((f64::from(*ours) - theirs).abs() < 1e-4, "{name} row {row}: {ours} vs transformers' {theirs}");
        }
        // Saved, it reloads with its beta and scores the same.
        let dir = tempfile::tempdir().unwrap();
        model.save_dir(dir.path()).unwrap();
        assert_eq!(LikelihoodRewardModel::saved_beta(dir.path()).unwrap(), Some(beta as f32));
        assert_eq!(LikelihoodRewardModel::saved_beta(&policy_fixture(name)).unwrap(), None);
        let reloaded = LikelihoodRewardModel::load_dir(dir.path(), None, &device).unwrap();
        assert_eq!(reloaded.score_rows(&rows).into_data().try_to_vec::<f32>().unwrap(), scores, "{name}");
        // A plain checkpoint without a beta is an error that says what to do.
        let error = LikelihoodRewardModel::load_dir(&policy_fixture(name), None, &device).unwrap_err();
        assert!(error.to_string().contains("give beta"), "{error}");
    }
}

/// Continuation rows are the prompt as the policy encodes it, then the completion's own tokens;
/// classifier rows mark where the completion starts too.
#[test]
fn continuation_rows_are_the_policy_prompt_then_the_completion() {
    let completion = " 12 + 7 = 19\n#### 19";
    // SmolLM2 puts no BOS in front; its chat-rendered prompt holds its special tokens.
    let smollm2 = shared_tokenizer("smollm2-instruct");
    let prompt = "<|im_start|>user\nQ: What is 12 + 7?<|im_end|>\n<|im_start|>assistant\n";
    let tokenizer = RewardTokenizer::new(smollm2.clone(), 256).with_layout(RowLayout::Continuation);
    let (ids, _, start) = tokenizer.encode_labelled(prompt, completion, None);
    let own = |text: &str, special: bool| -> Vec<i64> {
        smollm2.encode(text, special).unwrap().into_iter().map(i64::from).collect()
    };
    assert_eq!(ids, [own(prompt, false), own(completion, false)].concat());
    assert_eq!(start, own(prompt, false).len());
    // Llama 3 puts <|begin_of_text|> in front of a plain prompt, once; a cut keeps it, and the
    // completion start moves with the cut.
    let llama = shared_tokenizer("llama-3.2-instruct");
    let bos = i64::from(llama.prepended_bos().unwrap());
    let plain = "Q: What is 12 + 7?\nA:";
    let whole = RewardTokenizer::new(llama.clone(), 256).with_layout(RowLayout::Continuation);
    let (ids, _, start) = whole.encode_labelled(plain, completion, None);
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&id| id == bos).count(), 1);
    let completion_ids: Vec<i64> = llama.encode(completion, false).unwrap().into_iter().map(i64::from).collect();
    assert_eq!(ids[start..], completion_ids[..]);
    let limit = completion_ids.len() + 3;
    let cut = RewardTokenizer::new(llama.clone(), limit).with_layout(RowLayout::Continuation);
    let (short, _, short_start) = cut.encode_labelled(plain, completion, None);
    assert_eq!(short.len(), limit);
    assert_eq!((short[0], &short[short_start..]), (bos, &completion_ids[..]));
    assert_eq!(short[1..short_start], ids[start - 2..start]);
    // Classifier rows: `<bos> prompt \n completion <eos>`; the start is the completion's first token.
    let classifier = RewardTokenizer::new(smollm2.clone(), 256);
    let rows = classifier.batch(&[("What is 12 + 7?", "19"), ("Hi", completion)]);
    for (b, text) in ["19", completion].iter().enumerate() {
        let end = rows.lengths()[b] - 1;
        let ids: Vec<u32> = rows.ids[b][rows.completion_start[b]..end].iter().map(|&id| id as u32).collect();
        assert_eq!(smollm2.decode(&ids, false).unwrap(), *text, "row {b}");
    }
}

struct Setup {
    tokenizer: RewardTokenizer,
    train: Vec<Comparison>,
    held_out: Vec<Comparison>,
    config: ModelConfig,
}

/// Broken-format pairs: the rejected completion lacks the answer marker. (A random LM ranks them
/// right already, at a margin near 0; it cannot learn wrong answers in a test's budget.)
fn setup() -> Setup {
    let task =
        generate(&SyntheticConfig { train_size: 200, test_size: 40, max_operations: 1, seed: 3, ..Default::default() })
            .unwrap();
    let template = Template::Plain;
    let corpus: Vec<String> =
        task.train.problems.iter().map(|p| format!("{}\n{}", p.question, template.response(p))).collect();
    let tokenizer = train_tokenizer(corpus.into_iter(), 160).unwrap();
    let kind = |pairs: Vec<Comparison>| {
        pairs.into_iter().filter(|p| p.corruption == Corruption::BrokenFormat).collect::<Vec<_>>()
    };
    let config: ModelConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": tokenizer.vocab_size(), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true, "initializer_range": 0.02
    }))
    .unwrap();
    Setup {
        tokenizer: RewardTokenizer::new(tokenizer, 200).with_layout(RowLayout::Continuation),
        train: kind(build_comparisons(&task.train, template, 2, 0)),
        held_out: kind(build_comparisons(&task.test, template, 2, 1)),
        config,
    }
}

/// A random start, initialised under a lock so that tests side by side draw the same weights.
fn start(setup: &Setup, device: &Device, seed: u64, lora: bool) -> LikelihoodRewardModel {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    let model = LikelihoodRewardModel::new(CausalLm::init(&setup.config, device).unwrap(), 5.0);
    if lora {
        model.with_lora(&LoraSettings { rank: 4, alpha: 8.0, ..LoraSettings::default() }).unwrap()
    } else {
        model
    }
}

fn training(steps: u64, learning_rate: f64) -> RewardTrainingConfig {
    RewardTrainingConfig {
        steps,
        batch_size: 8,
        loss: PairwiseLoss::BradleyTerry,
        learning_rate,
        warmup_steps: 2,
        ..RewardTrainingConfig::default()
    }
}

#[test]
fn the_likelihood_verifier_learns_a_toy_set_in_full_and_with_lora() {
    let device = Device::flex().autodiff();
    let setup = setup();
    assert!(setup.train.len() >= 50 && setup.held_out.len() >= 20, "{} / {}", setup.train.len(), setup.held_out.len());
    for lora in [false, true] {
        let steps = 30;
        let mut trainer = RewardTrainer::start(start(&setup, &device, 7, lora), training(steps, 1e-2)).unwrap();
        let before = evaluate(trainer.model(), &setup.tokenizer, &setup.held_out, 32);
        for _ in 0..steps {
            assert!(trainer.train_step(&setup.train, &setup.tokenizer).unwrap().loss.is_finite());
        }
        let after = evaluate(trainer.model(), &setup.tokenizer, &setup.held_out, 32);
        println!(
            "lora {lora}: held-out accuracy {:.3} -> {:.3}, margin {:.3} -> {:.3}",
            before.accuracy, after.accuracy, before.mean_margin, after.mean_margin
        );
        assert!(after.accuracy >= 0.9, "lora {lora}: accuracy {:.3} -> {:.3}", before.accuracy, after.accuracy);
        // Full fine-tuning moves the LM head too (0.17 -> 6.0 at this seed); rank-4 adapters on a
        // width-32 trunk under a frozen tied head, less (0.17 -> 0.62).
        let gain = if lora { 0.3 } else { 2.0 };
        assert!(
            before.mean_margin.abs() < 0.5 && after.mean_margin > before.mean_margin + gain,
            "lora {lora}: margin {:.3} -> {:.3}",
            before.mean_margin,
            after.mean_margin
        );
    }
    // Rows of the other layout are refused, not scored at the wrong place.
    let mut trainer = RewardTrainer::start(start(&setup, &device, 7, false), training(1, 1e-2)).unwrap();
    let classifier = RewardTokenizer::new(setup.tokenizer.tokenizer().clone(), 200);
    let error = trainer.train_step(&setup.train, &classifier).unwrap_err();
    assert!(error.to_string().contains("Continuation"), "{error}");
}

#[test]
fn likelihood_verifier_training_resumes_exactly() {
    let device = Device::flex().autodiff();
    let setup = setup();
    for lora in [false, true] {
        let config = training(6, 1e-2);
        let dir = tempfile::tempdir().unwrap();
        let initial = start(&setup, &device, 11, lora);
        let kept = initial.clone();
        let mut straight = RewardTrainer::start(initial.clone(), config.clone()).unwrap();
        for _ in 0..6 {
            straight.train_step(&setup.train, &setup.tokenizer).unwrap();
        }
        let mut first = RewardTrainer::start(initial.clone(), config.clone()).unwrap();
        for _ in 0..3 {
            first.train_step(&setup.train, &setup.tokenizer).unwrap();
        }
        first.save_checkpoint(&dir.path().join("checkpoint")).unwrap();
        let mut resumed =
            RewardTrainer::resume_likelihood(initial, &dir.path().join("checkpoint"), config.clone()).unwrap();
        assert_eq!(resumed.step(), 3);
        for _ in 0..3 {
            resumed.train_step(&setup.train, &setup.tokenizer).unwrap();
        }
        let probe = &setup.held_out[..8];
        let a = evaluate(straight.model(), &setup.tokenizer, probe, 8);
        let b = evaluate(resumed.model(), &setup.tokenizer, probe, 8);
        assert_eq!(a, b, "lora {lora}");
        assert!(a.mean_margin != 0.0);
        // The base stays frozen under LoRA.
        if lora {
            let frozen = |model: &LikelihoodRewardModel| {
                policy_models::optim::parameter_values(&model.lm().adapters_disabled().valid())
                    .into_iter()
                    .filter(|(path, _)| !path.contains(".lora."))
                    .collect::<Vec<_>>()
            };
            assert_eq!(frozen(straight.model()), frozen(&kept));
        }
    }
}
