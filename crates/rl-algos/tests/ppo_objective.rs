//! PPO's per-token rewards, GAE, whitening (of advantages, and of rewards with `whiten_rewards`),
//! losses, metrics (`val/clipfrac`, `objective/kl`) and gradients against TRL's PPOTrainer
//! formulas in PyTorch, and the adaptive KL controller against TRL's old `AdaptiveKLController`
//! (fixture made by `tools/parity/make_ppo_fixtures.py`).

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use rl_algos::ppo::{
    AdaptiveKl, KlEstimator, PpoConfig, adaptive_kl_coef, epoch_order, minibatches, penalise_missing_eos,
    ppo_objective, ppo_targets,
};

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ppo_objective.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn table(value: &serde_json::Value) -> Vec<Vec<f32>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect()
}

fn tensor(rows: &[Vec<f32>], device: &Device) -> Tensor<2> {
    let width = rows[0].len();
    Tensor::from_data(
        TensorData::new(rows.iter().flatten().copied().collect::<Vec<f32>>(), [rows.len(), width]),
        device,
    )
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-5, "{what}: {a} vs {b}");
}

#[test]
fn targets_losses_and_gradients_match_trl() {
    let fixture = fixture();
    let lengths: Vec<usize> =
        fixture["lengths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
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
            whiten_rewards: case["whiten_rewards"].as_bool().unwrap(),
            ..PpoConfig::default()
        };
        let label = format!("{estimator:?}, whiten_rewards {}", config.whiten_rewards);
        let targets = ppo_targets(
            &table(&fixture["logprobs"]),
            &table(&fixture["ref_logprobs"]),
            &table(&fixture["values"]),
            &scores,
            &lengths,
            &config,
        );
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
        close(targets.sequence_kl, case["objective/kl"].as_f64().unwrap(), &format!("{label}: objective/kl"));

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
        close(metrics.value_clipfrac, case["val/clipfrac"].as_f64().unwrap(), &format!("{label}: val/clipfrac"));
        let gradients = loss.backward();
        for (name, param, key) in [("logprobs", &new_logprobs, "grad_logprobs"), ("vpred", &vpred, "grad_vpred")] {
            let ours = param.grad(&gradients).unwrap().into_data().try_to_vec::<f32>().unwrap();
            for (index, (a, b)) in ours.iter().zip(table(&case[key]).iter().flatten()).enumerate() {
                close(f64::from(*a), f64::from(*b), &format!("{label}: d loss / d {name} [{index}]"));
            }
        }
    }
}

#[test]
fn whitened_rewards_change_the_targets() {
    // The fixture's whiten_rewards case differs from the plain k1 one (so the check above bites).
    let fixture = fixture();
    let cases = fixture["cases"].as_array().unwrap();
    let (plain, whitened) = (table(&cases[0]["advantages"]), table(&cases[2]["advantages"]));
    assert!(cases[2]["whiten_rewards"].as_bool().unwrap() && !cases[0]["whiten_rewards"].as_bool().unwrap());
    assert!(plain.iter().flatten().zip(whitened.iter().flatten()).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn adaptive_kl_coefficient_follows_trl_controller() {
    let fixture = fixture();
    let spec = &fixture["adaptive_kl"];
    let settings = AdaptiveKl { target: spec["target"].as_f64().unwrap(), horizon: spec["horizon"].as_f64().unwrap() };
    let batch = spec["batch"].as_u64().unwrap() as usize;
    let mut value = spec["init_kl_coef"].as_f64().unwrap();
    for (current, expected) in spec["observed"].as_array().unwrap().iter().zip(spec["coefficients"].as_array().unwrap())
    {
        value = adaptive_kl_coef(value, current.as_f64().unwrap(), batch, &settings);
        assert!((value - expected.as_f64().unwrap()).abs() < 1e-12, "after KL {current}: {value} vs {expected}");
    }
}

#[test]
fn missing_eos_penalty_lowers_only_completions_without_eos() {
    use policy_models::generate::StopReason::{Eos, Length, StopString};
    let scores = [1.0, 1.0, 1.0];
    assert_eq!(penalise_missing_eos(&scores, &[Eos, Length, StopString], Some(0.5)), vec![1.0, 0.5, 0.5]);
    assert_eq!(penalise_missing_eos(&scores, &[Eos, Length, StopString], None), scores.to_vec());
}

#[test]
fn every_epoch_visits_the_rows_in_a_fresh_seeded_order() {
    let orders: Vec<Vec<usize>> = (0..4).map(|epoch| epoch_order(16, 7, 3, epoch)).collect();
    for order in &orders {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>(), "a permutation");
    }
    assert!(orders.windows(2).all(|pair| pair[0] != pair[1]), "each epoch draws its own order");
    assert_ne!(orders[0], (0..16).collect::<Vec<_>>(), "shuffled");
    assert_eq!(orders[1], epoch_order(16, 7, 3, 1), "seeded: a rerun visits the same minibatches");
    assert_ne!(orders[1], epoch_order(16, 7, 4, 1), "and the next step another order");
    assert_ne!(orders[1], epoch_order(16, 8, 3, 1), "and another seed another order");
    // The minibatches of an epoch are contiguous runs of its order: each row once.
    let mut seen: Vec<usize> = minibatches(16, 3).into_iter().flat_map(|range| orders[0][range].to_vec()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..16).collect::<Vec<_>>());
}
