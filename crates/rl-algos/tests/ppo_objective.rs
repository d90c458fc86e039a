//! PPO's per-token rewards, GAE, whitening, losses, metrics and gradients against TRL's
//! PPOTrainer formulas in PyTorch (fixture made by `tools/parity/make_ppo_fixtures.py`).

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use rl_algos::ppo::{KlEstimator, PpoConfig, ppo_objective, ppo_targets};

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ppo_objective.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn table(value: &serde_json::Value) -> Vec<Vec<f32>> {
    value.as_array().unwrap().iter().map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()).collect()
}

fn tensor(rows: &[Vec<f32>], device: &Device) -> Tensor<2> {
    let width = rows[0].len();
    Tensor::from_data(TensorData::new(rows.iter().flatten().copied().collect::<Vec<f32>>(), [rows.len(), width]), device)
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-5, "{what}: {a} vs {b}");
}

#[test]
fn targets_losses_and_gradients_match_trl() {
    let fixture = fixture();
    let lengths: Vec<usize> = fixture["lengths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let scores: Vec<f32> = fixture["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let device = Device::flex().autodiff();
    for case in fixture["cases"].as_array().unwrap() {
        let estimator: KlEstimator = serde_json::from_value(case["kl_estimator"].clone()).unwrap();
        let config = PpoConfig {
            kl_coef: fixture["kl_coef"].as_f64().unwrap(),
            kl_estimator: estimator,
            gamma: fixture["gamma"].as_f64().unwrap(),
            lam: fixture["lam"].as_f64().unwrap(),
            cliprange: fixture["cliprange"].as_f64().unwrap(),
            cliprange_value: fixture["cliprange_value"].as_f64().unwrap(),
            vf_coef: fixture["vf_coef"].as_f64().unwrap(),
            ..PpoConfig::default()
        };
        let label = format!("{estimator:?}");
        let targets = ppo_targets(&table(&fixture["logprobs"]), &table(&fixture["ref_logprobs"]), &table(&fixture["values"]), &scores, &lengths, &config);
        for (name, ours, theirs) in [
            ("rewards", &targets.rewards, table(&case["rewards"])),
            ("advantages", &targets.advantages, table(&case["advantages"])),
            ("returns", &targets.returns, table(&case["returns"])),
        ] {
            for (row, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                for t in 0..lengths[row] {
                    close(f64::from(a[t]), f64::from(b[t]), &format!("{label}: {name}[{row}][{t}]"));
                }
            }
        }
        close(targets.kl, case["kl"].as_f64().unwrap(), &format!("{label}: kl"));

        let new_logprobs = tensor(&table(&fixture["new_logprobs"]), &device).require_grad();
        let vpred = tensor(&table(&fixture["vpred"]), &device).require_grad();
        let (loss, metrics) = ppo_objective(
            new_logprobs.clone(),
            tensor(&table(&fixture["logprobs"]), &device),
            tensor(&targets.advantages, &device),
            vpred.clone(),
            tensor(&table(&fixture["values"]), &device),
            tensor(&targets.returns, &device),
            tensor(&table(&fixture["mask"]), &device),
            &config,
        );
        close(f64::from(loss.clone().into_scalar::<f32>()), case["loss"].as_f64().unwrap(), &format!("{label}: loss"));
        close(metrics.policy_loss, case["loss/policy"].as_f64().unwrap(), &format!("{label}: loss/policy"));
        close(metrics.value_loss, case["loss/value"].as_f64().unwrap(), &format!("{label}: loss/value"));
        close(metrics.approxkl, case["policy/approxkl"].as_f64().unwrap(), &format!("{label}: approxkl"));
        close(metrics.clipfrac, case["policy/clipfrac"].as_f64().unwrap(), &format!("{label}: clipfrac"));
        let gradients = loss.backward();
        for (name, param, key) in [("logprobs", &new_logprobs, "grad_logprobs"), ("vpred", &vpred, "grad_vpred")] {
            let ours = param.grad(&gradients).unwrap().into_data().try_to_vec::<f32>().unwrap();
            for (index, (a, b)) in ours.iter().zip(table(&case[key]).iter().flatten()).enumerate() {
                close(f64::from(*a), f64::from(*b), &format!("{label}: d loss / d {name} [{index}]"));
            }
        }
    }
}
