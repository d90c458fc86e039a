//! The likelihood verifier ([`LikelihoodRewardModel`]): its score against the mean completion
//! log-probability computed from transformers' logits (policy-models' tiny fixtures, made by
//! `tools/parity/make_fixtures.py`), the rows it reads on real tokenizers, saving and reloading.
//! Its training is tested beside the score head's, in `causal_training.rs`.

use std::path::PathBuf;

use burn::tensor::Device;
use policy_models::PolicyTokenizer;
use reward_model::train::RewardTokenizer;
use reward_model::{LikelihoodRewardModel, RewardModel, RewardRows, RowLayout};

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
