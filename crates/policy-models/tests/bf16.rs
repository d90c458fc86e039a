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

/// Generation in bf16 (through packed bf16 weights on a CPU with AVX-512 BF16) scores its own
/// tokens as an uncached bf16 pass over prompt + completion does: the cached decoding and the
/// training-shaped pass compute the same bf16 products.
#[test]
fn bf16_cached_decoding_matches_an_uncached_bf16_pass() {
    use policy_models::generate::{GenerationConfig, Sampler, completion_log_probs, generate};
    let device = Device::flex();
    let new_tokens = 6;
    for name in CASES {
        let (dir, reference) = fixture(name);
        let model = CausalLm::load_dir(&dir, &device).unwrap().with_compute_dtype(FloatDType::BF16);
        let prompts: Vec<Vec<i64>> = reference
            .input_ids
            .iter()
            .zip(&reference.attention_mask)
            .map(|(ids, mask)| ids.iter().zip(mask).filter(|(_, m)| **m == 1).map(|(id, _)| *id).collect())
            .collect();
        let config = GenerationConfig {
            max_new_tokens: new_tokens,
            sampler: Sampler::Greedy,
            eos_token_ids: vec![],
            pad_token_id: 0,
            seed: 0,
        };
        let generation = generate(&model, &prompts, &config, &[], None);
        let ids: Vec<Vec<i64>> = reference
            .input_ids
            .iter()
            .zip(&generation.completion_ids)
            .map(|(prompt, completion)| prompt.iter().chain(completion).copied().collect())
            .collect();
        let full_mask: Vec<Vec<bool>> = mask(&reference)
            .into_iter()
            .map(|mut row| {
                row.extend(std::iter::repeat_n(true, new_tokens));
                row
            })
            .collect();
        let (scored, _) = completion_log_probs(&model, &StepInput::from_padded(&ids, &full_mask), new_tokens, 1.0);
        let scored = scored.into_data().try_to_vec::<f32>().unwrap();
        let mut worst = 0.0f32;
        for (row, expected) in generation.log_probs.iter().enumerate() {
            for (step, value) in expected.iter().enumerate() {
                worst = worst.max((scored[row * new_tokens + step] - value).abs());
            }
        }
        println!("{name}: bf16 cached vs uncached log-probs differ by at most {worst:.5}");
        assert!(worst < 1e-4, "{name}: bf16 cached decoding vs an uncached pass: {worst}");
    }
}
