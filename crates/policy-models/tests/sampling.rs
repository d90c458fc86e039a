//! cotlab's sampler keeps the tokens transformers' warpers keep (temperature, then top-k, then
//! top-p over what top-k left) with the same renormalised probabilities (fixture made by
//! `tools/parity/make_sampling_fixtures.py`).

use std::path::PathBuf;

use policy_models::generate::{Sampler, choose, sampling_distribution};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    logits: Vec<f32>,
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    kept: Vec<usize>,
    probs: Vec<f64>,
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sampling.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn filtered_distributions_equal_transformers_warpers() {
    let fixture = fixture();
    assert!(fixture.cases.len() >= 8);
    for case in &fixture.cases {
        let sampler = Sampler::Sample { temperature: case.temperature, top_k: case.top_k, top_p: case.top_p };
        let mut distribution = sampling_distribution(&case.logits, sampler);
        // Most likely first.
        assert!(distribution.windows(2).all(|pair| pair[0].1 >= pair[1].1), "{}: not sorted", case.name);
        distribution.sort_by_key(|&(index, _)| index);
        let kept: Vec<usize> = distribution.iter().map(|&(index, _)| index).collect();
        assert_eq!(kept, case.kept, "{}: kept tokens", case.name);
        for (&(index, prob), &expected) in distribution.iter().zip(&case.probs) {
            assert!(
                (prob - expected).abs() < 1e-5,
                "{}: token {index} has probability {prob}, transformers {expected}",
                case.name
            );
        }
    }
}

#[test]
fn draws_come_only_from_the_kept_tokens_with_their_log_probs() {
    let fixture = fixture();
    let case = fixture.cases.iter().find(|case| case.name == "temperature_top_k_top_p_with_ties").unwrap();
    let sampler = Sampler::Sample { temperature: case.temperature, top_k: case.top_k, top_p: case.top_p };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut seen = vec![false; case.kept.len()];
    for _ in 0..2000 {
        let (token, log_prob) = choose(&case.logits, sampler, &mut rng);
        let at = case
            .kept
            .iter()
            .position(|&id| id as i64 == token)
            .unwrap_or_else(|| panic!("drew {token}, outside {:?}", case.kept));
        seen[at] = true;
        assert!((f64::from(log_prob) - case.probs[at].ln()).abs() < 1e-4, "token {token}: log-prob {log_prob}");
    }
    assert!(seen.iter().all(|&seen| seen), "every kept token is drawn at some point: {seen:?}");
}
