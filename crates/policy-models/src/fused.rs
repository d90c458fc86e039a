//! Fused CPU kernels through burn's backend-extension points: one pass over memory with a
//! vectorised `exp` where burn's flex backend composes several tensor ops and calls libm's scalar
//! `expf` per element (a perf profile of a supervised step put 15% of it in `__expf_fma`, most of
//! that in `gelu_new`'s sigmoid).
//!
//! [`FusedOps`] is implemented for flex and for autodiff over it (with a hand-written backward),
//! and only ever called on flex f32 tensors: [`fused_gelu_new`] hands other tensors back and the
//! caller composes ordinary tensor ops (GPU backends fuse those themselves).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

/// Elements per parallel task: below this a tensor is processed on one thread.
const CHUNK: usize = 16 * 1024;

/// `gelu_new`'s constants: y = x · sigmoid(K (x + C x³)), K = 2 sqrt(2/π).
const K: f32 = 1.595_769_1;
const C: f32 = 0.044_715;

/// Custom operations with fused CPU kernels.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// transformers' `gelu_new` element-wise.
    fn gelu_new(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The gradient of [`FusedOps::gelu_new`] at `x` times `grad`.
    fn gelu_new_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl FusedOps for Flex {
    fn gelu_new(x: FlexTensor) -> FlexTensor {
        map(&x, None, |x, _, out| gelu_new_slice(x, out))
    }

    fn gelu_new_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        map(&x, Some(&grad), |x, grad, out| gelu_new_backward_slice(x, grad.expect("a gradient"), out))
    }
}

impl<B: Backend + FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn gelu_new(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluNew;

        impl<B: Backend + FusedOps> Backward<B, 1> for GeluNew {
            type State = B::FloatTensorPrimitive;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let input = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| B::gelu_new_backward(input, grad));
            }
        }

        let (primitive, node) = x.into_parts();
        match GeluNew.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::gelu_new(primitive.clone());
                prep.finish(primitive, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_new(primitive)),
        }
    }

    fn gelu_new_backward(_x: FloatTensor<Self>, _grad: FloatTensor<Self>) -> FloatTensor<Self> {
        unimplemented!("gelu_new has no second derivative here")
    }
}

/// Whether `x` is a tensor the fused kernels serve: f32 on the CPU backend (with or without
/// autodiff).
fn served<const N: usize>(x: &Tensor<N>) -> bool {
    x.dtype() == DType::F32 && x.device() == Device::flex()
}

/// `gelu_new(x)` in one fused pass (with its fused backward under autodiff), or `x` back as the
/// error when it is not an f32 tensor on the CPU backend.
pub fn fused_gelu_new<const N: usize>(x: Tensor<N>) -> Result<Tensor<N>, Tensor<N>> {
    if !served(&x) {
        return Err(x);
    }
    Ok(Tensor::from_dispatch(<Dispatch as FusedOps>::gelu_new(x.into_dispatch())))
}

/// Applies `kernel(x, grad, out)` over contiguous copies of `x` (and `grad`) in parallel chunks.
fn map(x: &FlexTensor, grad: Option<&FlexTensor>, kernel: impl Fn(&[f32], Option<&[f32]>, &mut [f32]) + Sync) -> FlexTensor {
    let x = x.to_contiguous();
    let grad = grad.map(FlexTensor::to_contiguous);
    let shape = x.layout().shape().clone();
    let input = x.as_slice::<f32>().expect("contiguous f32");
    let grad = grad.as_ref().map(|g| g.as_slice::<f32>().expect("contiguous f32"));
    let mut out = vec![0.0f32; input.len()];
    if input.len() <= CHUNK {
        kernel(input, grad, &mut out);
    } else {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, out)| {
            let range = i * CHUNK..i * CHUNK + out.len();
            kernel(&input[range.clone()], grad.map(|g| &g[range]), out);
        });
    }
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// e^x for x in about [-87, 88] (clamped outside), Cephes' `expf` polynomial: relative error
/// about 2e-7, branch-free so that loops over it vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5.000_000_1e-1);
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits((((n as i32) + 127) as u32) << 23)
}

#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn gelu_new_slice(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        let u = K * (x + C * x * x * x);
        *o = x / (1.0 + exp(-u));
    }
}

#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn gelu_new_backward_slice(x: &[f32], grad: &[f32], out: &mut [f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
        let s = 1.0 / (1.0 + exp(-K * (x + C * x * x * x)));
        *o = g * (s + x * s * (1.0 - s) * K * (1.0 + 3.0 * C * x * x));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range_sigmoid_uses() {
        for i in -870..=880 {
            let x = i as f32 * 0.1;
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            assert!(((got - want) / want).abs() < 5e-7, "exp({x}) = {got}, expected {want}");
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
    }

    #[test]
    fn fused_gelu_new_and_its_gradient_match_the_composed_ops() {
        let device = Device::flex().autodiff();
        let values: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 4e-4).collect();
        let x = || Tensor::<1>::from_data(TensorData::new(values.clone(), [values.len()]), &device).require_grad();
        let fused_input = x();
        let fused = fused_gelu_new(fused_input.clone()).expect("flex f32 is served");
        let composed_input = x();
        let composed = crate::layers::gelu_new_composed(composed_input.clone());
        let weights = Tensor::<1>::from_data(TensorData::new((0..values.len()).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(), [values.len()]), &device);
        let fused_grads = (fused.clone() * weights.clone()).sum().backward();
        let composed_grads = (composed.clone() * weights).sum().backward();
        let close = |a: Tensor<1>, b: Tensor<1>, what: &str| {
            let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
            let worst = a.iter().zip(&b).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0f32, f32::max);
            assert!(worst < 1e-6, "{what}: worst relative difference {worst}");
        };
        close(fused, composed, "values");
        close(fused_input.grad(&fused_grads).unwrap(), composed_input.grad(&composed_grads).unwrap(), "gradients");
    }

    #[test]
    fn other_devices_and_dtypes_are_not_served() {
        let x = Tensor::<1>::from_floats([1.0, 2.0], &Device::flex()).cast(burn::tensor::FloatDType::BF16);
        assert!(fused_gelu_new(x).is_err());
    }
}
