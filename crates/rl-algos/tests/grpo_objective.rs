//! GRPO's advantages, losses, KL and clip metrics, and the loss gradient, against TRL's
//! formulas evaluated by PyTorch (fixture made by `tools/parity/make_rl_fixtures.py`), within 1e-5.

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use rl_algos::advantages::{ScaleRewards, group_advantages};
use rl_algos::grpo::{GrpoConfig, LossType, grpo_objective};

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/grpo_objective.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    match value {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

fn matrix(value: &serde_json::Value, device: &Device) -> Tensor<2> {
    let rows = value.as_array().unwrap().len();
    let values = floats(value);
    let columns = values.len() / rows;
    Tensor::from_data(TensorData::new(values, [rows, columns]), device)
}

fn close(a: f32, b: f32, what: &str) {
    assert!((a - b).abs() <= 1e-5, "{what}: {a} vs {b}");
}

#[test]
fn advantages_match_trl_for_each_scaling() {
    let fixture = fixture();
    let rewards = floats(&fixture["rewards"]);
    let g = fixture["num_generations"].as_u64().unwrap() as usize;
    for (name, scale) in [("group", ScaleRewards::Group), ("batch", ScaleRewards::Batch), ("none", ScaleRewards::None)]
    {
        let (ours, zero_std) = group_advantages(&rewards, g, scale);
        for (a, b) in ours.iter().zip(floats(&fixture["advantages"][name])) {
            close(*a, b, &format!("advantage ({name})"));
        }
        // The second group's rewards are all equal.
        assert_eq!(zero_std, vec![false, false, false, false, true, true, true, true]);
    }
}

#[test]
fn losses_metrics_and_gradients_match_trl() {
    let fixture = fixture();
    let device = Device::flex().autodiff();
    let inner = device.clone().without_autodiff();
    let advantages = floats(&fixture["advantages"]["group"]);
    for case in fixture["losses"].as_array().unwrap() {
        let loss_type: LossType = serde_json::from_value(case["loss_type"].clone()).unwrap();
        let beta = case["beta"].as_f64().unwrap();
        let config = GrpoConfig {
            epsilon: fixture["epsilon"].as_f64().unwrap(),
            epsilon_high: Some(fixture["epsilon_high"].as_f64().unwrap()),
            beta,
            loss_type,
            max_completion_length: fixture["max_completion_length"].as_u64().unwrap() as usize,
            ..GrpoConfig::default()
        };
        let logps = matrix(&fixture["per_token_logps"], &device).require_grad();
        let old = matrix(&fixture["old_per_token_logps"], &inner);
        let reference = matrix(&fixture["ref_per_token_logps"], &inner);
        let mask = matrix(&fixture["mask"], &inner);
        let advantages = Tensor::<1>::from_data(TensorData::new(advantages.clone(), [advantages.len()]), &inner);
        let (loss, metrics) = grpo_objective(
            logps.clone(),
            Tensor::from_inner(old),
            Some(Tensor::from_inner(reference)),
            None,
            Tensor::from_inner(advantages),
            Tensor::from_inner(mask),
            &config,
            None,
        );
        let label = format!("{loss_type:?}, beta {beta}");
        close(loss.clone().into_scalar::<f32>(), case["loss"].as_f64().unwrap() as f32, &format!("{label}: loss"));
        close(metrics.kl as f32, case["kl"].as_f64().unwrap() as f32, &format!("{label}: kl"));
        for (ours, key) in [
            (metrics.clip_ratio_low_mean, "clip_ratio/low_mean"),
            (metrics.clip_ratio_high_mean, "clip_ratio/high_mean"),
            (metrics.clip_ratio_region_mean, "clip_ratio/region_mean"),
        ] {
            close(ours as f32, case[key].as_f64().unwrap() as f32, &format!("{label}: {key}"));
        }
        let gradients = loss.backward();
        let grad = logps.grad(&gradients).unwrap().into_data().try_to_vec::<f32>().unwrap();
        for (index, (ours, theirs)) in grad.iter().zip(floats(&case["grad"])).enumerate() {
            close(*ours, theirs, &format!("{label}: gradient {index}"));
        }
    }
}

#[test]
fn validation_names_the_value_and_the_fix() {
    let bad = GrpoConfig { num_generations: 1, ..GrpoConfig::default() };
    assert!(bad.validate().unwrap_err().contains("num_generations = 1"));
    // TRL accepts Dr. GRPO's aggregation with any reward scaling.
    for scale_rewards in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
        GrpoConfig { loss_type: LossType::DrGrpo, scale_rewards, ..GrpoConfig::default() }.validate().unwrap();
    }
    let bad = GrpoConfig { delta: Some(0.9), ..GrpoConfig::default() };
    assert!(bad.validate().unwrap_err().contains("grpo.delta = 0.9"));
    let bad = GrpoConfig { top_entropy_quantile: 1.5, ..GrpoConfig::default() };
    assert!(bad.validate().unwrap_err().contains("grpo.top_entropy_quantile = 1.5"));
    let bad = GrpoConfig { sync_ref_model: true, ..GrpoConfig::default() };
    assert!(bad.validate().unwrap_err().contains("sync_ref_model = true with beta = 0"));
    let bad = GrpoConfig { sync_ref_model: true, beta: 0.04, ref_model_mixup_alpha: 1.5, ..GrpoConfig::default() };
    assert!(bad.validate().unwrap_err().contains("ref_model_mixup_alpha = 1.5"));
    GrpoConfig { sync_ref_model: true, beta: 0.04, ..GrpoConfig::default() }.validate().unwrap();
    let bad = GrpoConfig { epsilon_high: Some(0.1), ..GrpoConfig::default() };
    assert!(bad.validate().unwrap_err().contains("epsilon_high"));
    GrpoConfig::default().validate().unwrap();
}
