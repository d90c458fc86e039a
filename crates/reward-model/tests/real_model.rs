//! The causal-LM reward model on the real SmolLM2-135M-Instruct (GGUF, `../shared/models/`):
//! loads with an initialised head, scores left- and right-padded rows alike, saves (for
//! `tools/parity/check_saved.py`-style checks with transformers), and times LoRA
//! Bradley-Terry steps. Ignored by default (needs the file, ~1 min on 2 cores):
//!
//!     cargo test -p reward-model --test real_model -- --ignored --nocapture

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;
use policy_models::{LoraSettings, ModelSource, PolicyTokenizer};
use reward_model::comparisons::{Comparison, Corruption};
use reward_model::train::{RewardTokenizer, RewardTrainer, RewardTrainingConfig};
use reward_model::{CausalRewardModel, HeadSource};

#[test]
#[ignore]
fn smollm2_as_a_reward_model() {
    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = ModelSource::Gguf(gguf).resolve().unwrap();
    let tokenizer = PolicyTokenizer::load_dir(&dir).unwrap();
    let pad = tokenizer.pad_id.or(tokenizer.eos_ids.first().copied()).unwrap();
    let device = Device::flex();
    let (model, head) = CausalRewardModel::load_dir(&dir, Some(pad), &device).unwrap();
    assert_eq!(head, HeadSource::Initialised);
    let reward_tokenizer = RewardTokenizer::new(tokenizer.clone(), 256);
    let texts = [
        ("What is 12 + 7?", "12 + 7 = 19\n#### 19"),
        ("What is 3 * 4?", "3 * 4 = 12. The answer is 12."),
        ("Hi", "Hello"),
    ];
    let rows = reward_tokenizer.batch(&texts);
    let (ids, mask) = (&rows.ids, &rows.mask);
    let right = model.score(ids, mask).into_data().try_to_vec::<f32>().unwrap();
    // Each row alone (no padding) gives its padded score: padding is masked and not scored.
    for (row, text) in texts.iter().enumerate() {
        let one = reward_tokenizer.batch(&[*text]);
        let alone = model.score(&one.ids, &one.mask).into_data().try_to_vec::<f32>().unwrap()[0];
        assert!((alone - right[row]).abs() < 1e-3, "row {row}: {alone} alone, {} padded", right[row]);
    }
    println!("pad id {pad}; scores {right:?}; ids {ids:?}");
    if let Some(keep) = std::env::var_os("COTLAB_KEEP_SAVED") {
        let out = std::path::Path::new(&keep).join("smollm2_rm");
        model.save_dir(&out).unwrap();
        tokenizer.save(&out.join("tokenizer.json")).unwrap();
        std::fs::write(out.join("reference.json"), serde_json::json!({"input_ids": ids, "attention_mask": mask.iter().map(|r| r.iter().map(|&m| i64::from(m)).collect::<Vec<_>>()).collect::<Vec<_>>(), "scores": right}).to_string()).unwrap();
    }
    // Cost of LoRA Bradley-Terry steps of 4 pairs on this machine.
    let autodiff = device.autodiff();
    let (model, _) = CausalRewardModel::load_dir(&dir, Some(pad), &autodiff).unwrap();
    let model = model.with_lora(&LoraSettings::default()).unwrap();
    let pair = |q: &str, good: &str, bad: &str| Comparison {
        prompt: q.into(),
        chosen: good.into(),
        rejected: bad.into(),
        corruption: Corruption::WrongAnswer,
        rejected_error: None,
    };
    let pairs = vec![
        pair("What is 12 + 7?", "12 + 7 = 19\n#### 19", "12 + 7 = 18\n#### 18"),
        pair("What is 3 * 4?", "3 * 4 = 12\n#### 12", "3 * 4 = 7\n#### 7"),
        pair("What is 9 - 5?", "9 - 5 = 4\n#### 4", "9 - 5 = 14\n#### 14"),
        pair("What is 6 + 6?", "6 + 6 = 12\n#### 12", "6 + 6 = 13\n#### 13"),
    ];
    let mut trainer = RewardTrainer::start(
        model,
        RewardTrainingConfig {
            steps: 3,
            batch_size: 4,
            learning_rate: 1e-4,
            warmup_steps: 0,
            ..RewardTrainingConfig::default()
        },
    )
    .unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let step = trainer.train_step(&pairs, &reward_tokenizer).unwrap();
        println!(
            "LoRA step of 4 pairs: {:.2} s, loss {:.4}, accuracy {:.2}",
            started.elapsed().as_secs_f64(),
            step.loss,
            step.accuracy
        );
        assert!(step.loss.is_finite());
    }
}
