//! GRPO's branches beyond the default objective against TRL 1.16's `_compute_loss` transcribed
//! in PyTorch (`tools/parity/make_rl_fixtures.py` -> `fixtures/grpo_variants.json`): both clip
//! sides with both advantage signs, `delta`, sequence-level importance sampling (GSPO),
//! `top_entropy_quantile`, `entropy_coef`, gradient accumulation (`bnpo` per micro-batch), and
//! DAPO's soft overlong punishment; and cotlab's own handling of zero-variance groups.

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use rl_algos::advantages::{ScaleRewards, group_advantages};
use rl_algos::grpo::{
    BatchTotals, GrpoConfig, ImportanceSamplingLevel, LossType, ZeroStdGroups, entropy_threshold, entropy_token_count,
    grpo_objective, reward_spread, skip_zero_std,
};
use rl_algos::rewards::{RewardInput, RewardKind};

fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    match value {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

fn shape(value: &serde_json::Value) -> [usize; 2] {
    let rows = value.as_array().unwrap().len();
    [rows, floats(value).len() / rows]
}

fn close(a: f32, b: f32, what: &str) {
    assert!((a - b).abs() <= 1e-5, "{what}: {a} vs {b}");
}

/// The inputs of the objective, rows `rows` of the fixture's batch.
struct Inputs {
    logps: Vec<f32>,
    old: Vec<f32>,
    reference: Vec<f32>,
    entropies: Vec<f32>,
    mask: Vec<f32>,
    advantages: Vec<f32>,
    width: usize,
}

impl Inputs {
    fn of(fixture: &serde_json::Value) -> Self {
        let [_, width] = shape(&fixture["per_token_logps"]);
        Self {
            logps: floats(&fixture["per_token_logps"]),
            old: floats(&fixture["old_per_token_logps"]),
            reference: floats(&fixture["ref_per_token_logps"]),
            entropies: fixture.get("entropies").map_or_else(|| vec![0.0; floats(&fixture["mask"]).len()], floats),
            mask: floats(&fixture["mask"]),
            advantages: fixture.get("advantages").filter(|a| a.is_array()).map_or_else(Vec::new, floats),
            width,
        }
    }
}

fn config_of(case: &serde_json::Value, fixture: &serde_json::Value) -> GrpoConfig {
    GrpoConfig {
        epsilon: fixture["epsilon"].as_f64().unwrap(),
        epsilon_high: Some(fixture["epsilon_high"].as_f64().unwrap()),
        max_completion_length: fixture["max_completion_length"].as_u64().unwrap() as usize,
        loss_type: serde_json::from_value(case["loss_type"].clone()).unwrap(),
        beta: case["beta"].as_f64().unwrap(),
        delta: case["delta"].as_f64(),
        importance_sampling_level: serde_json::from_value(case["importance_sampling_level"].clone()).unwrap(),
        top_entropy_quantile: case["top_entropy_quantile"].as_f64().unwrap(),
        entropy_coef: case["entropy_coef"].as_f64().unwrap(),
        ..GrpoConfig::default()
    }
}

#[test]
fn variants_match_trl_losses_gradients_and_metrics() {
    let fixture = fixture("grpo_variants.json");
    let inputs = Inputs::of(&fixture);
    let rows = inputs.mask.len() / inputs.width;
    let width = inputs.width;
    let device = Device::flex().autodiff();
    let inner = device.clone().without_autodiff();
    let matrix = |values: &[f32], rows: usize, device: &Device| {
        Tensor::<2>::from_data(TensorData::new(values.to_vec(), [rows, width]), device)
    };
    for case in fixture["cases"].as_array().unwrap() {
        let config = config_of(case, &fixture);
        let label = format!(
            "{} {} delta {} quantile {} entropy_coef {} beta {} micro-batches {}",
            case["loss_type"],
            case["importance_sampling_level"],
            case["delta"],
            case["top_entropy_quantile"],
            case["entropy_coef"],
            case["beta"],
            case["micro_batches"]
        );
        let logps = matrix(&inputs.logps, rows, &device).require_grad();
        let entropies = matrix(&inputs.entropies, rows, &device).require_grad();
        let micro_batches = case["micro_batches"].as_u64().unwrap() as usize;
        let micro = rows / micro_batches;
        let tokens: f32 = inputs.mask.iter().sum();
        let mut loss_sum: Option<Tensor<1>> = None;
        let mut metrics = None;
        for k in 0..micro_batches {
            let range = k * micro..(k + 1) * micro;
            let cells = range.start * width..range.end * width;
            let micro_mask = &inputs.mask[cells.clone()];
            // One micro-batch alone is the whole batch: the objective finds its own totals.
            let totals = (micro_batches > 1).then(|| {
                let threshold =
                    entropy_threshold(&inputs.entropies[cells.clone()], micro_mask, config.top_entropy_quantile);
                BatchTotals {
                    sequences: rows,
                    tokens,
                    micro_batch_tokens: micro_mask.iter().sum(),
                    entropy_tokens: entropy_token_count(&inputs.entropies[cells.clone()], micro_mask, threshold),
                    micro_batches,
                    entropy_threshold: threshold,
                }
            });
            let (loss, objective) = grpo_objective(
                logps.clone().slice([range.clone(), 0..width]),
                Tensor::from_inner(matrix(&inputs.old[cells.clone()], micro, &inner)),
                Some(Tensor::from_inner(matrix(&inputs.reference[cells.clone()], micro, &inner))),
                Some(entropies.clone().slice([range.clone(), 0..width])),
                Tensor::from_inner(Tensor::<1>::from_data(
                    TensorData::new(inputs.advantages[range.clone()].to_vec(), [micro]),
                    &inner,
                )),
                Tensor::from_inner(matrix(micro_mask, micro, &inner)),
                &config,
                totals,
            );
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + loss,
                None => loss,
            });
            metrics = Some(objective);
        }
        let loss = loss_sum.unwrap();
        close(loss.clone().into_scalar::<f32>(), case["loss"].as_f64().unwrap() as f32, &format!("{label}: loss"));
        if let (Some(expected), Some(metrics)) = (case.get("metrics"), metrics) {
            for (ours, key) in [
                (metrics.clip_ratio_low_mean, "clip_ratio/low_mean"),
                (metrics.clip_ratio_high_mean, "clip_ratio/high_mean"),
                (metrics.clip_ratio_region_mean, "clip_ratio/region_mean"),
                (metrics.kl, "kl"),
            ] {
                if let Some(value) = expected.get(key) {
                    close(ours as f32, value.as_f64().unwrap() as f32, &format!("{label}: {key}"));
                }
            }
        }
        let gradients = loss.backward();
        let grad = logps.grad(&gradients).unwrap().into_data().try_to_vec::<f32>().unwrap();
        for (index, (ours, theirs)) in grad.iter().zip(floats(&case["grad"])).enumerate() {
            close(*ours, theirs, &format!("{label}: gradient {index}"));
        }
        let expected_entropy_grad = floats(&case["entropy_grad"]);
        let entropy_grad = entropies
            .grad(&gradients)
            .map_or_else(|| vec![0.0; expected_entropy_grad.len()], |g| g.into_data().try_to_vec::<f32>().unwrap());
        for (index, (ours, theirs)) in entropy_grad.iter().zip(expected_entropy_grad).enumerate() {
            close(*ours, theirs, &format!("{label}: entropy gradient {index}"));
        }
    }
}

/// The fixture reaches every side of the clip with each advantage sign, and the default case's
/// clip metrics are nonzero on both sides (so the metric checks above can fail).
#[test]
fn the_fixture_clips_on_both_sides_with_both_signs() {
    let fixture = fixture("grpo_variants.json");
    for (what, count) in fixture["clip_coverage"].as_object().unwrap() {
        assert!(count.as_u64().unwrap() > 0, "no token with {what}");
    }
    let case = &fixture["cases"][0];
    assert_eq!(case["importance_sampling_level"], "token");
    assert!(case["metrics"]["clip_ratio/low_mean"].as_f64().unwrap() > 0.0);
    assert!(case["metrics"]["clip_ratio/high_mean"].as_f64().unwrap() > 0.0);
    // delta changes the loss (a negative-advantage ratio above delta exists).
    let loss = |lt: &str, delta: Option<f64>| {
        fixture["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["loss_type"] == lt && c["delta"].as_f64() == delta && c["importance_sampling_level"] == "token")
            .unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    assert!((loss("grpo", None) - loss("grpo", Some(1.5))).abs() > 1e-3);
}

/// `bnpo` under gradient accumulation is TRL's: a token mean per micro-batch over the number of
/// micro-batches, not `dapo`'s whole-batch token mean (the fixture's two agree on one micro-batch).
#[test]
fn bnpo_under_accumulation_differs_from_dapo_as_in_trl() {
    let fixture = fixture("grpo_variants.json");
    let loss = |lt: &str, micro: u64| {
        fixture["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["loss_type"] == lt
                    && c["micro_batches"] == micro
                    && c["delta"].is_null()
                    && c["importance_sampling_level"] == "token"
                    && c["top_entropy_quantile"] == 1.0
                    && c["entropy_coef"] == 0.0
            })
            .unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    assert!((loss("bnpo", 1) - loss("dapo", 1)).abs() < 1e-7);
    assert!((loss("dapo", 2) - loss("dapo", 1)).abs() < 1e-6);
    assert!((loss("bnpo", 2) - loss("dapo", 2)).abs() > 1e-3, "bnpo {} vs dapo {}", loss("bnpo", 2), loss("dapo", 2));
}

/// Runs the objective over the default fixture with `mask`; returns loss and d loss / d logps.
fn objective_with(
    fixture: &serde_json::Value,
    rows: std::ops::Range<usize>,
    mask: &[f32],
    config: &GrpoConfig,
    totals: Option<BatchTotals>,
) -> (f32, Vec<f32>) {
    let inputs = Inputs::of(fixture);
    let width = inputs.width;
    let advantages = floats(&fixture["advantages"]["group"]);
    let count = rows.len();
    let cells = rows.start * width..rows.end * width;
    let device = Device::flex().autodiff();
    let inner = device.clone().without_autodiff();
    let matrix = |values: &[f32], device: &Device| {
        Tensor::<2>::from_data(TensorData::new(values.to_vec(), [count, width]), device)
    };
    let logps = matrix(&inputs.logps[cells.clone()], &device).require_grad();
    let (loss, _) = grpo_objective(
        logps.clone(),
        Tensor::from_inner(matrix(&inputs.old[cells.clone()], &inner)),
        Some(Tensor::from_inner(matrix(&inputs.reference[cells.clone()], &inner))),
        None,
        Tensor::from_inner(Tensor::<1>::from_data(TensorData::new(advantages[rows].to_vec(), [count]), &inner)),
        Tensor::from_inner(matrix(mask, &inner)),
        config,
        totals,
    );
    let value = loss.clone().into_scalar::<f32>();
    let grad = logps.grad(&loss.backward()).unwrap().into_data().try_to_vec::<f32>().unwrap();
    (value, grad)
}

/// With `zero_std_groups = skip`, the loss is the loss of the other groups alone for every
/// aggregation: the skipped completions leave the divisors (N' for `grpo` and `dr_grpo`, tokens
/// for `bnpo` and `dapo`), so the loss does not shrink by the kept fraction. And with beta > 0
/// they get no gradient at all (trl#5588's concern: TRL keeps their KL gradient by design).
#[test]
fn skipped_groups_leave_the_loss_and_its_divisors() {
    let fixture = fixture("grpo_objective.json");
    let mask = floats(&fixture["mask"]);
    let [rows, width] = shape(&fixture["mask"]);
    let rewards = floats(&fixture["rewards"]);
    let (_, zero_std) =
        group_advantages(&rewards, fixture["num_generations"].as_u64().unwrap() as usize, ScaleRewards::Group);
    let kept_rows = 0..4;
    assert_eq!(zero_std, [vec![false; 4], vec![true; 4]].concat(), "the fixture's second group is flat");
    let (skipped_mask, sequences) = skip_zero_std(&mask, &zero_std, ZeroStdGroups::Skip);
    assert_eq!(sequences, 4);
    for loss_type in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo] {
        let config = GrpoConfig {
            beta: 0.04,
            loss_type,
            max_completion_length: 8,
            epsilon_high: Some(0.28),
            ..GrpoConfig::default()
        };
        let tokens: f32 = skipped_mask.iter().sum();
        let totals = BatchTotals {
            sequences,
            tokens,
            micro_batch_tokens: tokens,
            entropy_tokens: tokens,
            micro_batches: 1,
            entropy_threshold: None,
        };
        let (loss, grad) = objective_with(&fixture, 0..rows, &skipped_mask, &config, Some(totals));
        let (alone, grad_alone) = objective_with(&fixture, kept_rows.clone(), &mask[..4 * width], &config, None);
        close(loss, alone, &format!("{loss_type:?}: loss with the flat group skipped vs without it"));
        for (index, (a, b)) in grad[..4 * width].iter().zip(&grad_alone).enumerate() {
            close(*a, *b, &format!("{loss_type:?}: gradient {index}"));
        }
        assert!(
            grad[4 * width..].iter().all(|g| *g == 0.0),
            "{loss_type:?}: skipped completions got gradients {:?}",
            &grad[4 * width..]
        );
    }
}

/// With `keep` (TRL's objective), a flat group's completions get exactly the KL term's gradient,
/// beta (1 - exp(ref - logp)) / tokens under `dapo`, and no policy-term gradient.
#[test]
fn kept_flat_groups_move_only_through_the_kl_term() {
    let fixture = fixture("grpo_objective.json");
    let inputs = Inputs::of(&fixture);
    let mask = floats(&fixture["mask"]);
    let [rows, width] = shape(&fixture["mask"]);
    let beta = 0.04;
    let config = GrpoConfig {
        beta,
        loss_type: LossType::Dapo,
        max_completion_length: 8,
        epsilon_high: Some(0.28),
        ..GrpoConfig::default()
    };
    let (kept_mask, sequences) = skip_zero_std(&mask, &[vec![false; 4], vec![true; 4]].concat(), ZeroStdGroups::Keep);
    assert_eq!((kept_mask.as_slice(), sequences), (mask.as_slice(), rows));
    let (_, grad) = objective_with(&fixture, 0..rows, &mask, &config, None);
    let tokens: f32 = mask.iter().sum();
    let mut moved = false;
    for index in 4 * width..rows * width {
        let kl_grad =
            beta as f32 * (1.0 - (inputs.reference[index] - inputs.logps[index]).exp()) * mask[index] / tokens;
        close(grad[index], kl_grad, &format!("flat-group gradient {index}"));
        moved |= grad[index] != 0.0;
    }
    assert!(moved, "with beta > 0 the KL term moves the flat group's tokens");
    let (_, without_kl) = objective_with(&fixture, 0..rows, &mask, &GrpoConfig { beta: 0.0, ..config }, None);
    assert!(without_kl[4 * width..].iter().all(|g| *g == 0.0));
}

/// TRL's `reward_std` is the std of the whole batch's rewards whatever the scaling; its
/// `frac_reward_zero_std` tests the std the advantages divide by: the group's, or with
/// `scale_rewards = batch` the batch's.
#[test]
fn reward_spread_metrics_follow_the_scaling() {
    let rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 2.0];
    let batch_std = (4.0f64 / 7.0).sqrt();
    for scale in [ScaleRewards::Group, ScaleRewards::None] {
        let (std, frac) = reward_spread(&rewards, 4, scale);
        assert!((std - batch_std).abs() < 1e-6 && frac == 0.5, "{scale:?}: {std} {frac}");
    }
    let (std, frac) = reward_spread(&rewards, 4, ScaleRewards::Batch);
    assert!((std - batch_std).abs() < 1e-6 && frac == 0.0, "batch: {std} {frac}");
    assert_eq!(reward_spread(&[0.5; 8], 4, ScaleRewards::Batch), (0.0, 1.0));
}

/// `top_entropy_quantile`'s threshold is `torch.quantile`'s (linear interpolation) over the
/// mask's tokens only.
#[test]
fn entropy_threshold_interpolates_like_torch_quantile() {
    let entropies = [0.0, 1.0, 2.0, 3.0, 100.0];
    let mask = [1.0, 1.0, 1.0, 1.0, 0.0];
    assert_eq!(entropy_threshold(&entropies, &mask, 1.0), None);
    // torch.quantile([0, 1, 2, 3], 0.5) = 1.5; 0.8 -> 2.4.
    assert_eq!(entropy_threshold(&entropies, &mask, 0.5), Some(1.5));
    assert!((entropy_threshold(&entropies, &mask, 0.2).unwrap() - 2.4).abs() < 1e-6);
    assert_eq!(entropy_threshold(&entropies, &mask, 0.0), Some(3.0));
    assert_eq!(entropy_token_count(&entropies, &mask, Some(1.5)), 2.0);
}

#[test]
fn sequence_level_is_token_level_for_one_token_completions() {
    // A completion of one token has the same ratio either way; the GSPO fixture cases cover the rest.
    let fixture = fixture("grpo_objective.json");
    let width = shape(&fixture["mask"])[1];
    let mut mask = vec![0.0; 8 * width];
    for row in 0..8 {
        mask[row * width] = 1.0;
    }
    let token = GrpoConfig { beta: 0.04, loss_type: LossType::Grpo, epsilon_high: Some(0.28), ..GrpoConfig::default() };
    let sequence = GrpoConfig { importance_sampling_level: ImportanceSamplingLevel::Sequence, ..token.clone() };
    let (a, ga) = objective_with(&fixture, 0..8, &mask, &token, None);
    let (b, gb) = objective_with(&fixture, 0..8, &mask, &sequence, None);
    close(a, b, "loss");
    for (x, y) in ga.iter().zip(&gb) {
        close(*x, *y, "gradient");
    }
}

#[test]
fn soft_overlong_punishment_matches_trl() {
    let fixture = fixture("grpo_variants.json");
    for case in fixture["soft_overlong_punishment"].as_array().unwrap() {
        let kind = RewardKind::SoftOverlongPunishment {
            max_completion_len: case["max_completion_len"].as_u64().unwrap() as usize,
            soft_punish_cache: case["soft_punish_cache"].as_u64().unwrap() as usize,
        };
        kind.validate().unwrap();
        for (length, expected) in case["lengths"].as_array().unwrap().iter().zip(floats(&case["rewards"])) {
            let input = RewardInput {
                prompt: "",
                completion: "",
                answer: "",
                completion_tokens: length.as_u64().unwrap() as usize,
            };
            close(kind.reward(&input), expected, &format!("{kind:?} at {length} tokens"));
        }
    }
    let bad = RewardKind::SoftOverlongPunishment { max_completion_len: 10, soft_punish_cache: 11 };
    assert!(bad.validate().unwrap_err().contains("soft_punish_cache = 11"));
}
