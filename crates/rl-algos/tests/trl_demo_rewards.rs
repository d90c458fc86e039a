//! The TRL GRPO demo's five rewards against the demo's own Python on varied completions
//! (fixture made by `tools/fixtures/make_reward_fixtures.py`).

use std::path::PathBuf;

use rl_algos::rewards::{RewardInput, RewardKind};

#[test]
fn demo_rewards_equal_the_python_reference() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_demo_rewards.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let kinds = [
        RewardKind::XmlCorrectness,
        RewardKind::XmlInteger,
        RewardKind::XmlStrictFormat,
        RewardKind::XmlSoftFormat,
        RewardKind::XmlCount,
    ];
    for case in fixture["cases"].as_array().unwrap() {
        let input = RewardInput {
            prompt: "",
            completion: case["completion"].as_str().unwrap(),
            answer: case["answer"].as_str().unwrap(),
            completion_tokens: 0,
        };
        for kind in kinds {
            let expected = case[kind.name()].as_f64().unwrap() as f32;
            let ours = kind.reward(&input);
            assert!(
                (ours - expected).abs() < 1e-6,
                "{}: {:?} gave {ours}, Python {expected}",
                kind.name(),
                input.completion
            );
        }
    }
}
