//! RLOO's advantages and sequence-level loss against a PyTorch transcription of TRL 1.16's
//! `RLOOTrainer` (fixture made by `tools/parity/make_rloo_fixtures.py`): the k1 KL summed per
//! completion, taken off the reward before the leave-one-out baseline, optional normalisation,
//! and the clipped per-sequence ratio loss with its gradient per token and its clip shares.

use std::path::PathBuf;

use algo_rloo::{rloo_advantages, rloo_sequence_loss, sequence_kl_sums};
use burn::tensor::{Device, Tensor, TensorData};

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rloo.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    match value {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

fn assert_close(ours: &[f32], expected: &[f32], tolerance: f32, what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}");
    for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
        assert!((a - b).abs() <= tolerance, "{what}[{i}]: {a} vs {b}");
    }
}

struct Inputs {
    rows: usize,
    width: usize,
    mask: Vec<f32>,
}

fn inputs(fixture: &serde_json::Value) -> Inputs {
    let lengths: Vec<usize> =
        fixture["lengths"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap() as usize).collect();
    let width = fixture["old_per_token_logps"][0].as_array().unwrap().len();
    let mask = lengths.iter().flat_map(|&l| (0..width).map(move |t| if t < l { 1.0 } else { 0.0 })).collect();
    Inputs { rows: lengths.len(), width, mask }
}

#[test]
fn advantages_take_the_summed_k1_kl_off_the_reward_before_the_baseline() {
    let fixture = fixture();
    let Inputs { rows, width, mask } = inputs(&fixture);
    let device = Device::flex();
    let table = |name: &str| Tensor::<2>::from_data(TensorData::new(floats(&fixture[name]), [rows, width]), &device);
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows, width]), &device);
    let kl = sequence_kl_sums(table("old_per_token_logps"), table("ref_per_token_logps"), mask);
    let k = fixture["num_generations"].as_u64().unwrap() as usize;
    let beta = fixture["beta"].as_f64().unwrap();
    let rewards = floats(&fixture["rewards"]);
    for case in fixture["cases"].as_array().unwrap() {
        assert_close(&kl, &floats(&case["sequence_kl"]), 1e-5, "sequence KL");
        let normalize = case["normalize_advantages"].as_bool().unwrap();
        let advantages = rloo_advantages(&rewards, Some(&kl), beta, k, normalize);
        assert_close(&advantages, &floats(&case["advantages"]), 1e-5, &format!("advantages (normalize {normalize})"));
    }
    // Without the penalty the advantages differ: the KL does enter before the baseline.
    let plain = rloo_advantages(&rewards, None, beta, k, false);
    assert!(plain.iter().zip(floats(&fixture["cases"][0]["advantages"])).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn sequence_loss_its_gradient_and_clip_shares_match_trl() {
    let fixture = fixture();
    let Inputs { rows, width, mask } = inputs(&fixture);
    let device = Device::flex().autodiff();
    let eps = (fixture["epsilon"].as_f64().unwrap(), fixture["epsilon_high"].as_f64().unwrap());
    let old = floats(&fixture["old_per_token_logps"]);
    let old_sums: Vec<f32> =
        (0..rows).map(|r| (0..width).map(|t| old[r * width + t] * mask[r * width + t]).sum()).collect();
    for case in fixture["cases"].as_array().unwrap() {
        let new =
            Tensor::<2>::from_data(TensorData::new(floats(&fixture["new_per_token_logps"]), [rows, width]), &device)
                .require_grad();
        let (loss, clip) = rloo_sequence_loss(
            new.clone(),
            Tensor::from_data(TensorData::new(old_sums.clone(), [rows]), &device),
            Tensor::from_data(TensorData::new(floats(&case["advantages"]), [rows]), &device),
            Tensor::from_data(TensorData::new(mask.clone(), [rows, width]), &device),
            eps,
            rows as f64,
        );
        let value = f64::from(loss.clone().into_scalar::<f32>());
        assert!((value - case["loss"].as_f64().unwrap()).abs() < 1e-6, "loss {value} vs {}", case["loss"]);
        let clip_ratio = case["clip_ratio_region_mean"].as_f64().unwrap();
        assert!(clip_ratio > 0.0, "the fixture exercises the clip");
        assert!(
            (clip.low + clip.high - clip_ratio).abs() < 1e-9,
            "clip share {} vs {clip_ratio}",
            clip.low + clip.high
        );
        let grads = loss.backward();
        let grad = new.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap();
        assert_close(&grad, &floats(&case["grad_per_token_logps"]), 1e-6, "d loss / d per-token log-probs");
    }
}

#[test]
fn one_update_per_rollout_is_reinforce_with_the_sequence_log_prob() {
    // With pi_old the differentiated policy (rho = 1), the gradient per real token is -A_i / N.
    let device = Device::flex().autodiff();
    let logps = Tensor::<2>::from_data(TensorData::new(vec![-0.5f32, -1.0, -2.0, -0.1, -0.3, -0.7], [2, 3]), &device)
        .require_grad();
    let mask = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 1.0, 0.0, 1.0, 1.0, 1.0], [2, 3]), &device);
    let old = (logps.clone().detach() * mask.clone()).sum_dim(1).reshape([2]);
    let advantages = Tensor::<1>::from_data(TensorData::new(vec![1.5f32, -0.5], [2]), &device);
    let (loss, clip) = rloo_sequence_loss(logps.clone(), old, advantages, mask, (0.2, 0.2), 2.0);
    assert!((f64::from(loss.clone().into_scalar::<f32>()) - (-(1.5 - 0.5) / 2.0)).abs() < 1e-6);
    assert_eq!(clip.low + clip.high, 0.0);
    let grad = logps.grad(&loss.backward()).unwrap().into_data().try_to_vec::<f32>().unwrap();
    assert_close(&grad, &[-0.75, -0.75, 0.0, 0.25, 0.25, 0.25], 1e-6, "REINFORCE gradient");
}
