//! The bf16 compute option (`CausalLm::with_compute_dtype`) on the tiny parity checkpoints,
//! against transformers run with `dtype=torch.bfloat16` (`tools/parity/make_bf16_fixtures.py`).
//! bf16 keeps 8 significant bits and the two stacks round in different places, so the check is a
//! tolerance scaled by transformers' own bf16-vs-f32 gap, plus proof that cotlab really computed
//! in bf16 (its logits move away from its f32 ones by a similar amount).

mod common;

use burn::tensor::{Device, FloatDType};
use common::{CASES, fixture, mask};
use policy_models::{CausalLm, StepInput};
use serde::Deserialize;

#[derive(Deserialize)]
struct Bf16Reference {
    logits: Vec<Vec<Vec<f32>>>,
    max_abs_diff_from_f32: f32,
}

#[test]
fn bf16_logits_match_transformers_bf16_within_its_own_rounding_gap() {
    let device = Device::flex();
    for name in CASES {
        let (dir, reference) = fixture(name);
        let bf16: Bf16Reference =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference_bf16.json")).unwrap()).unwrap();
        let f32_model = CausalLm::load_dir(&dir, &device).unwrap();
        let model = CausalLm::load_dir(&dir, &device).unwrap().with_compute_dtype(FloatDType::BF16);
        assert_eq!(model.compute_dtype(), FloatDType::BF16);
        let input = StepInput::from_padded(&reference.input_ids, &mask(&reference));
        let ours = model.forward(&input, &mut model.new_cache());
        let ours_f32 = f32_model.forward(&input, &mut f32_model.new_cache());
        assert_eq!(ours.dtype(), burn::tensor::DType::F32, "{name}: logits come back in f32");
        let [batch, length, vocab] = ours.dims();
        let ours = ours.into_data().try_to_vec::<f32>().unwrap();
        let ours_f32 = ours_f32.into_data().try_to_vec::<f32>().unwrap();
        let (mut to_transformers, mut to_own_f32) = (0.0f32, 0.0f32);
        for b in 0..batch {
            for t in (0..length).filter(|&t| reference.attention_mask[b][t] == 1) {
                for v in 0..vocab {
                    let index = (b * length + t) * vocab + v;
                    to_transformers = to_transformers.max((ours[index] - bf16.logits[b][t][v]).abs());
                    to_own_f32 = to_own_f32.max((ours[index] - ours_f32[index]).abs());
                }
            }
        }
        let gap = bf16.max_abs_diff_from_f32;
        println!(
            "{name}: |cotlab bf16 - transformers bf16| {to_transformers:.4}, |cotlab bf16 - f32| {to_own_f32:.4}, transformers' own gap {gap:.4}"
        );
        assert!(
            to_transformers <= 2.0 * gap.max(0.02),
            "{name}: {to_transformers} vs transformers' own bf16 gap {gap}"
        );
        assert!(to_own_f32 > 1e-3, "{name}: bf16 logits equal the f32 ones ({to_own_f32}): nothing ran in bf16");
    }
}
