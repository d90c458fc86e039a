//! Parity with transformers on tiny random checkpoints (made by `tools/parity/make_fixtures.py`):
//! logits within 1e-4 (max abs) at every real position of a left-padded batch.

mod common;

use burn::tensor::Device;
use common::{CASES, fixture, mask};
use policy_models::{CausalLm, StepInput};

#[test]
fn logits_match_transformers_within_1e_4() {
    let device = Device::flex();
    for name in CASES {
        let (dir, reference) = fixture(name);
        let model = CausalLm::load_dir(&dir, &device).unwrap();
        let input = StepInput::from_padded(&reference.input_ids, &mask(&reference));
        let logits = model.forward(&input, &mut model.new_cache());
        let [batch, length, vocab] = logits.dims();
        let values = logits.into_data().try_to_vec::<f32>().unwrap();
        let mut worst = 0.0f32;
        for b in 0..batch {
            for t in 0..length {
                if reference.attention_mask[b][t] == 0 {
                    continue;
                }
                for v in 0..vocab {
                    let ours = values[(b * length + t) * vocab + v];
                    worst = worst.max((ours - reference.logits[b][t][v]).abs());
                }
            }
        }
        println!("{name}: max |logit difference| = {worst:.2e}");
        assert!(worst <= 1e-4, "{name}: max abs logit difference {worst}");
    }
}
