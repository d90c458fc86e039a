//! How much of the CPU's matrix-product speed a training step reaches: the step's matrix-product
//! FLOPs over its seconds, against a large f32 product measured in the same process.

use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Distribution, Tensor};
use policy_models::CausalLm;

/// Parameter elements of every rank-2 weight, by id.
struct Shapes(Vec<(ParamId, usize)>);

impl ModuleVisitor for Shapes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if D == 2 {
            self.0.push((param.id, param.shape().num_elements()));
        }
    }
}

/// The weights a token's forward pass multiplies by in the body (every rank-2 parameter but the
/// token and position embeddings and the LM head): 2 FLOPs per weight per token.
fn body_weights(model: &CausalLm) -> usize {
    let mut shapes = Shapes(Vec::new());
    model.visit(&mut shapes);
    let excluded: Vec<ParamId> = policy_models::optim::parameter_paths(model)
        .into_iter()
        .filter(|(path, _)| ["embed", "wte", "wpe", "lm_head"].iter().any(|name| path.contains(name)))
        .map(|(_, id)| id)
        .collect();
    shapes.0.iter().filter(|(id, _)| !excluded.contains(id)).map(|(_, elements)| elements).sum()
}

/// Matrix-product FLOPs of one training step (forward and backward) over sequences of `lengths`
/// tokens with the loss on `loss_positions` of them: per token 2 x the body's weights, per loss
/// position 2 x C x V through the LM head, and per layer and sequence attention's two products
/// over the T x T scores (4 x C x T², as computed under the causal mask). The backward pass
/// costs twice the forward pass in full fine-tuning (the input and the weight gradients); with
/// LoRA the frozen weights get no gradient, so it costs once the forward pass (counting the
/// adapters' thin products as part of the body). Padding is not counted.
pub fn training_step_flops(model: &CausalLm, lengths: &[usize], loss_positions: usize, lora: bool) -> f64 {
    let config = model.config();
    let (width, layers, vocab) = (config.hidden_size() as f64, config.num_layers() as f64, config.vocab_size() as f64);
    let tokens: f64 = lengths.iter().map(|&length| length as f64).sum();
    let attention: f64 = lengths.iter().map(|&length| 4.0 * width * (length as f64).powi(2) * layers).sum();
    let forward = 2.0 * body_weights(model) as f64 * tokens + 2.0 * width * vocab * loss_positions as f64 + attention;
    forward * if lora { 2.0 } else { 3.0 }
}

/// The best of three products of two 2048 x 2048 matrices on `device` in `dtype`, in GFLOP/s
/// (rayon's pool, as training uses it). bf16 goes through the product a bf16 training pass
/// uses (`policy_models::fused::matmul`: the AVX-512 BF16 kernel where the CPU has it).
pub fn matmul_peak_gflops(device: &Device, dtype: burn::tensor::FloatDType) -> f64 {
    const N: usize = 2048;
    let a = Tensor::<2>::random([N, N], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let b = Tensor::<2>::random([N, N], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let started = Instant::now();
        let product = policy_models::fused::matmul(a.clone(), b.clone());
        let _ = product.into_data(); // waits for the product on asynchronous backends
        best = best.min(started.elapsed().as_secs_f64());
    }
    2.0 * (N as f64).powi(3) / best / 1e9
}
