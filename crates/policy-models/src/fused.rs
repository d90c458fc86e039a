//! Fused CPU kernels through burn's backend-extension points: `gelu_new`, softmax and
//! log-softmax, each one pass over memory (per row for the softmaxes) with a vectorised `exp`,
//! where burn's flex backend composes several tensor ops (five for a softmax under autodiff) and
//! calls libm's scalar `expf` per element (a perf profile of a supervised step put 15% of it in
//! `__expf_fma`, most of that in `gelu_new`'s sigmoid).
//!
//! [`FusedOps`] is implemented for flex and for autodiff over it (with hand-written backward
//! passes), and only ever called on flex f32 tensors: the `fused_*` functions hand other tensors
//! back and their callers use burn's ops (GPU backends fuse those themselves).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, Slice, backend_extension};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use rayon::prelude::*;

/// Elements per parallel task: below this a tensor is processed on one thread.
const CHUNK: usize = 16 * 1024;

/// `gelu_new`'s constants: y = x · sigmoid(K (x + C x³)), K = 2 sqrt(2/π).
const K: f32 = 1.595_769;
const C: f32 = 0.044_715;

/// Custom operations with fused CPU kernels.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// transformers' `gelu_new` element-wise.
    fn gelu_new(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The gradient of [`FusedOps::gelu_new`] at `x` times `grad`.
    fn gelu_new_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Softmax over the last dimension.
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Softmax's input gradient from its output `y` and output gradient: y (g - Σ g y).
    fn softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Log-softmax over the last dimension.
    fn log_softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Log-softmax's input gradient from its output `y` and output gradient: g - e^y Σ g.
    fn log_softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x` [.., K] times a weight packed by [`pack_linear`] ([S, K + 1, 16]: strips of 16
    /// output features, the bias last), giving [.., 16 S]. Inference only (no backward).
    fn packed_linear(x: FloatTensor<Self>, packed: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Attention of one new position per sequence over all keys: `query` [B, H, 1, D], `key`
    /// and `value` [B, K, S, D] (any strides; query head h reads key/value head h / (H / K)),
    /// `blocked` [B, 1, 1, S] true where masked → [B, H, 1, D]. Inference only.
    fn decode_attention(
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        value: FloatTensor<Self>,
        blocked: BoolTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
    /// The LM head fused with log-softmax and the gather of the target: for `hidden` [R, C],
    /// `head` [C, V] (a `Linear` weight; [V, C] when `transposed`, a tied embedding table) and
    /// `targets` [R], per row [log p(target), entropy, logsumexp] ([R, 3]) of
    /// softmax(hidden · head / temperature), in blocks of [`HEAD_ROWS`] x [`HEAD_VOCAB`] logits.
    fn head_log_probs(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        transposed: bool,
    ) -> FloatTensor<Self>;
    /// The gradients of [`FusedOps::head_log_probs`] w.r.t. `hidden` and `head` (each only when
    /// wanted, else an empty tensor) from its `output` and the output gradient, recomputing the
    /// logits block by block.
    #[allow(clippy::too_many_arguments, reason = "one op's inputs, output and options")]
    fn head_log_probs_backward(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        temperature: f32,
        transposed: bool,
        want_hidden: bool,
        want_head: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `lhs` [.., M, K] times `rhs` [.., K, N] (the same batch dimensions, bf16 or f32 each)
    /// with bf16 products accumulated in f32 ([`crate::bf16_gemm`]); the result in f32 when
    /// `f32_out`, else rounded to bf16 as PyTorch's bf16 product is. Only sent on CPUs with
    /// AVX-512 BF16 (see [`matmul`]).
    fn matmul_bf16(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, f32_out: bool) -> FloatTensor<Self>;
}

impl FusedOps for Flex {
    fn gelu_new(x: FlexTensor) -> FlexTensor {
        map(&x, None, |x, _, out| gelu_new_slice(x, out), CHUNK)
    }

    fn gelu_new_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        map(&x, Some(&grad), |x, grad, out| gelu_new_backward_slice(x, grad.expect("a gradient"), out), CHUNK)
    }

    fn softmax_last(x: FlexTensor) -> FlexTensor {
        map_rows(&x, None, |x, _, out| softmax_row(x, out))
    }

    fn softmax_last_backward(y: FlexTensor, grad: FlexTensor) -> FlexTensor {
        map_rows(&y, Some(&grad), |y, grad, out| softmax_backward_row(y, grad.expect("a gradient"), out))
    }

    fn log_softmax_last(x: FlexTensor) -> FlexTensor {
        map_rows(&x, None, |x, _, out| log_softmax_row(x, out))
    }

    fn log_softmax_last_backward(y: FlexTensor, grad: FlexTensor) -> FlexTensor {
        map_rows(&y, Some(&grad), |y, grad, out| log_softmax_backward_row(y, grad.expect("a gradient"), out))
    }

    fn packed_linear(x: FlexTensor, packed: FlexTensor) -> FlexTensor {
        let (x, packed) = (x.to_contiguous(), packed.to_contiguous());
        let mut shape: Vec<usize> = x.layout().shape().as_slice().to_vec();
        let depth = shape.last().copied().unwrap_or(0);
        let [strips, packed_depth, lanes] =
            <[usize; 3]>::try_from(packed.layout().shape().as_slice()).expect("a packed weight [S, K + 1, 16]");
        assert!(
            packed_depth == depth + 1 && lanes == STRIP,
            "packed_linear: input depth {depth}, packed weight [{strips}, {packed_depth}, {lanes}]"
        );
        let input = x.as_slice::<f32>().expect("contiguous f32");
        let rows = input.len().checked_div(depth).unwrap_or(0);
        let mut out = vec![0.0f32; rows * strips * STRIP];
        packed_linear_rows(input, rows, depth, packed.as_slice::<f32>().expect("contiguous f32"), strips, &mut out);
        *shape.last_mut().expect("rank at least 1") = strips * STRIP;
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn decode_attention(
        query: FlexTensor,
        key: FlexTensor,
        value: FlexTensor,
        blocked: FlexTensor,
        scale: f32,
    ) -> FlexTensor {
        let query = query.to_contiguous();
        let blocked = blocked.to_contiguous();
        let dims = |t: &FlexTensor| <[usize; 4]>::try_from(t.layout().shape().as_slice()).expect("a rank-4 tensor");
        let [batch, heads, queries, dim] = dims(&query);
        let [_, kv_heads, keys, _] = dims(&key);
        assert!(
            queries == 1 && dims(&key) == [batch, kv_heads, keys, dim] && dims(&value) == dims(&key),
            "decode_attention: shapes"
        );
        assert!(dims(&blocked) == [batch, 1, 1, keys], "decode_attention: mask shape");
        let group = heads / kv_heads;
        let q = query.as_slice::<f32>().expect("contiguous f32");
        let mask = &blocked.storage::<u8>()[blocked.layout().start_offset()..];
        // Rows of D must be contiguous in key and value; other strides are read as they are.
        let (key, value) = (rows_contiguous(key), rows_contiguous(value));
        let (ks, vs) = (key.layout().strides().to_vec(), value.layout().strides().to_vec());
        let (k_data, v_data) = (
            &key.storage::<f32>()[key.layout().start_offset()..],
            &value.storage::<f32>()[value.layout().start_offset()..],
        );
        let mut out = vec![0.0f32; batch * heads * dim];
        let mut scores = vec![0.0f32; keys];
        for b in 0..batch {
            for h in 0..heads {
                let kv = h / group;
                let start = |strides: &[isize]| (b as isize * strides[0] + kv as isize * strides[1]) as usize;
                attend(
                    &q[(b * heads + h) * dim..][..dim],
                    (&k_data[start(&ks)..], ks[2] as usize),
                    (&v_data[start(&vs)..], vs[2] as usize),
                    &mask[b * keys..][..keys],
                    scale,
                    &mut scores,
                    &mut out[(b * heads + h) * dim..][..dim],
                );
            }
        }
        FlexTensor::from_data(TensorData::new(out, [batch, heads, 1, dim]))
    }

    fn head_log_probs(
        hidden: FlexTensor,
        head: FlexTensor,
        targets: FlexTensor,
        temperature: f32,
        transposed: bool,
    ) -> FlexTensor {
        let (rows, vocab) = head_dims(&hidden, &head, transposed);
        let targets = host_ids(&targets, rows, vocab);
        let inverse = 1.0 / temperature;
        let bf16 = head.dtype() == DType::BF16;
        let mut states = vec![HeadRow::default(); rows];
        for row_block in blocks(rows, HEAD_ROWS) {
            let h = slice_rows(&hidden, row_block.clone());
            for vocab_block in blocks(vocab, HEAD_VOCAB) {
                let width = vocab_block.len();
                let logits =
                    product(h.clone(), head_columns(&head, vocab_block.clone(), transposed), bf16).to_contiguous(); // [r, v]
                let logits = logits.as_slice::<f32>().expect("contiguous f32");
                states[row_block.clone()]
                    .par_iter_mut()
                    .zip(logits.par_chunks(width))
                    .zip(&targets[row_block.clone()])
                    .for_each(|((state, z), &target)| {
                        let local = (vocab_block.contains(&target)).then(|| target - vocab_block.start);
                        state.update(z, inverse, local);
                    });
            }
        }
        let out: Vec<f32> = states.iter().flat_map(HeadRow::finish).collect();
        FlexTensor::from_data(TensorData::new(out, [rows, 3]))
    }

    fn head_log_probs_backward(
        hidden: FlexTensor,
        head: FlexTensor,
        targets: FlexTensor,
        output: FlexTensor,
        grad: FlexTensor,
        temperature: f32,
        transposed: bool,
        want_hidden: bool,
        want_head: bool,
    ) -> (FlexTensor, FlexTensor) {
        let (rows, vocab) = head_dims(&hidden, &head, transposed);
        let bf16 = head.dtype() == DType::BF16;
        let depth = hidden.layout().shape()[1];
        let targets = host_ids(&targets, rows, vocab);
        let (output, grad) = (output.to_contiguous(), grad.to_contiguous());
        let (output, grad) = (output.as_slice::<f32>().expect("f32"), grad.as_slice::<f32>().expect("f32"));
        let inverse = 1.0 / temperature;
        let mut d_hidden = vec![0.0f32; if want_hidden { rows * depth } else { 0 }];
        let mut d_head = vec![0.0f32; if want_head { vocab * depth } else { 0 }];
        for vocab_block in blocks(vocab, HEAD_VOCAB) {
            let width = vocab_block.len();
            let w = head_columns(&head, vocab_block.clone(), transposed); // [C, v]
            let mut d_w: Option<FlexTensor> = None; // [C, v], or [v, C] when transposed
            for row_block in blocks(rows, HEAD_ROWS) {
                let h = slice_rows(&hidden, row_block.clone());
                let mut logits = product(h.clone(), w.clone(), bf16).into_data().try_into_vec::<f32>().expect("f32"); // [r, v]
                logits.par_chunks_mut(width).zip(row_block.clone()).for_each(|(z, row)| {
                    let target = targets[row];
                    let local = (vocab_block.contains(&target)).then(|| target - vocab_block.start);
                    head_grad_row(z, inverse, &output[row * 3..row * 3 + 3], &grad[row * 3..row * 3 + 3], local);
                });
                let g = FlexTensor::from_data(TensorData::new(logits, [row_block.len(), width])); // dloss/dz [r, v]
                if want_hidden {
                    let d_h = product(g.clone(), Flex::float_transpose(w.clone()), bf16)
                        .into_data()
                        .try_into_vec::<f32>()
                        .expect("f32"); // [r, C]
                    d_hidden[row_block.start * depth..row_block.end * depth]
                        .par_iter_mut()
                        .zip(d_h)
                        .for_each(|(total, value)| *total += value);
                }
                if want_head {
                    let block = if transposed {
                        product(Flex::float_transpose(g), h, bf16)
                    } else {
                        product(Flex::float_transpose(h), g, bf16)
                    };
                    d_w = Some(match d_w {
                        Some(total) => Flex::float_add(total, block),
                        None => block,
                    });
                }
            }
            if let Some(d_w) = d_w {
                let d_w = d_w.to_contiguous();
                let d_w = d_w.as_slice::<f32>().expect("f32");
                if transposed {
                    d_head[vocab_block.start * depth..vocab_block.end * depth].copy_from_slice(d_w);
                } else {
                    for (k, row) in d_w.chunks_exact(width).enumerate() {
                        d_head[k * vocab + vocab_block.start..k * vocab + vocab_block.end].copy_from_slice(row);
                    }
                }
            }
        }
        let head_shape = if transposed { [vocab, depth] } else { [depth, vocab] };
        let d_hidden = if want_hidden {
            TensorData::new(d_hidden, [rows, depth])
        } else {
            TensorData::new(Vec::<f32>::new(), [0, depth])
        };
        let d_head = if !want_head {
            TensorData::new(Vec::<f32>::new(), [0, depth])
        } else if bf16 {
            // The gradient of a bf16 operand is bf16, as the cast's backward pass expects.
            TensorData::new(crate::bf16_gemm::to_bf16(&d_head), head_shape)
        } else {
            TensorData::new(d_head, head_shape)
        };
        (FlexTensor::from_data(d_hidden), FlexTensor::from_data(d_head))
    }

    fn matmul_bf16(lhs: FlexTensor, rhs: FlexTensor, f32_out: bool) -> FlexTensor {
        let (out, shape) = native_matmul(&lhs, &rhs);
        if f32_out {
            return FlexTensor::from_data(TensorData::new(out, shape));
        }
        FlexTensor::from_data(TensorData::new(crate::bf16_gemm::to_bf16(&out), shape))
    }
}

/// `lhs` [.., M, K] times `rhs` [.., K, N] (equal batch dimensions, bf16 or f32 elements, any
/// strides) through [`crate::bf16_gemm`]: the f32 result and its shape.
fn native_matmul(lhs: &FlexTensor, rhs: &FlexTensor) -> (Vec<f32>, Vec<usize>) {
    let (ls, rs) = (lhs.layout().shape().as_slice(), rhs.layout().shape().as_slice());
    let rank = ls.len();
    assert!(
        rank >= 2 && rs.len() == rank && ls[..rank - 2] == rs[..rank - 2] && ls[rank - 1] == rs[rank - 2],
        "matmul_bf16: {ls:?} x {rs:?}"
    );
    let (m, n) = (ls[rank - 2], rs[rank - 1]);
    let batch: usize = ls[..rank - 2].iter().product();
    let mut shape = ls.to_vec();
    shape[rank - 1] = n;
    let mut out = vec![0.0f32; batch * m * n];
    if out.is_empty() {
        return (out, shape);
    }
    fn view(t: &FlexTensor, b: usize) -> crate::bf16_gemm::MatRef<'_> {
        let layout = t.layout();
        let rank = layout.num_dims();
        let (dims, strides) = (layout.shape().as_slice(), layout.strides());
        // The batch index `b` unravelled over the leading dimensions, row-major.
        let (mut rest, mut offset) = (b, layout.start_offset() as isize);
        for d in (0..rank - 2).rev() {
            offset += (rest % dims[d]) as isize * strides[d];
            rest /= dims[d];
        }
        crate::bf16_gemm::MatRef {
            elems: match t.dtype() {
                DType::BF16 => crate::bf16_gemm::Elems::Bf16(t.storage::<half::bf16>()),
                DType::F32 => crate::bf16_gemm::Elems::F32(t.storage::<f32>()),
                other => panic!("matmul_bf16: {other:?} operand"),
            },
            offset: offset as usize,
            rows: dims[rank - 2],
            cols: dims[rank - 1],
            row_stride: strides[rank - 2],
            col_stride: strides[rank - 1],
        }
    }
    if batch == 1 {
        crate::bf16_gemm::matmul(view(lhs, 0), view(rhs, 0), &mut out);
    } else {
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(b, out)| crate::bf16_gemm::matmul(view(lhs, b), view(rhs, b), out));
    }
    (out, shape)
}

/// `a` times `b` in f32, with bf16 products (the native kernel, [`native_matmul`]) when `bf16`
/// (a bf16 head: its logits and gradients as PyTorch computes them under autocast), else
/// flex's f32 product.
fn product(a: FlexTensor, b: FlexTensor, bf16: bool) -> FlexTensor {
    if bf16 {
        let (out, shape) = native_matmul(&a, &b);
        FlexTensor::from_data(TensorData::new(out, shape))
    } else {
        Flex::float_matmul(a, b)
    }
}

/// Rows and vocabulary entries per block of logits in [`FusedOps::head_log_probs`] and its
/// backward pass: at most 1024 x 4096 floats (16 MB) of logits exist at a time, whatever the
/// batch and the vocabulary, where the unfused path holds [R, V] logits and several tensors of
/// that size for the backward pass (3 GB each for 64 rows of 250 tokens over SmolLM2's 49152).
pub const HEAD_ROWS: usize = 1024;
/// See [`HEAD_ROWS`].
pub const HEAD_VOCAB: usize = 4096;

/// `0..len` in ranges of `size`.
fn blocks(len: usize, size: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len).step_by(size.max(1)).map(move |start| start..(start + size).min(len))
}

/// (R, V) of a fused head's inputs, checked.
fn head_dims(hidden: &FlexTensor, head: &FlexTensor, transposed: bool) -> (usize, usize) {
    let [rows, depth] = <[usize; 2]>::try_from(hidden.layout().shape().as_slice()).expect("hidden states [R, C]");
    let [a, b] = <[usize; 2]>::try_from(head.layout().shape().as_slice()).expect("a head weight of rank 2");
    let (head_depth, vocab) = if transposed { (b, a) } else { (a, b) };
    assert_eq!(head_depth, depth, "head_log_probs: hidden width {depth}, head {:?} (transposed: {transposed})", [a, b]);
    (rows, vocab)
}

/// Target ids as indices, checked against the vocabulary.
fn host_ids(targets: &FlexTensor, rows: usize, vocab: usize) -> Vec<usize> {
    let ids: Vec<i64> = targets.clone().into_data().convert::<i64>().try_into_vec::<i64>().expect("integer ids");
    assert_eq!(ids.len(), rows, "head_log_probs: one target per row");
    ids.into_iter()
        .map(|id| {
            assert!(
                (0..vocab as i64).contains(&id),
                "head_log_probs: target id {id} outside the vocabulary of {vocab}"
            );
            id as usize
        })
        .collect()
}

/// Rows `range` of a [R, C] tensor (a view).
fn slice_rows(x: &FlexTensor, range: std::ops::Range<usize>) -> FlexTensor {
    Flex::float_slice(
        x.clone(),
        &[Slice::new(range.start as isize, Some(range.end as isize), 1), Slice::new(0, None, 1)],
    )
}

/// Vocabulary entries `range` of a head as a [C, v] view (strided when `transposed`; flex's
/// matmul reads strides without copying).
fn head_columns(head: &FlexTensor, range: std::ops::Range<usize>, transposed: bool) -> FlexTensor {
    let range = Slice::new(range.start as isize, Some(range.end as isize), 1);
    if transposed {
        Flex::float_transpose(Flex::float_slice(head.clone(), &[range, Slice::new(0, None, 1)]))
    } else {
        Flex::float_slice(head.clone(), &[Slice::new(0, None, 1), range])
    }
}

/// One row's running state over vocabulary blocks, an online log-sum-exp of u = z / temperature:
/// the maximum m so far, S = Σ e^(u - m) and D = Σ e^(u - m) (u - m), from which
///   logsumexp = m + ln S,  entropy = -Σ p log p = ln S - D / S
/// (relative to m, so that a small entropy is not the difference of two large numbers).
#[derive(Debug, Clone, Copy)]
struct HeadRow {
    max: f32,
    sum: f64,
    spread: f64,
    target: f32,
}

impl Default for HeadRow {
    fn default() -> Self {
        Self { max: f32::NEG_INFINITY, sum: 0.0, spread: 0.0, target: f32::NAN }
    }
}

impl HeadRow {
    /// Folds in a block of raw logits `z`; `target` is the target's index in the block, if there.
    fn update(&mut self, z: &[f32], inverse: f32, target: Option<usize>) {
        if let Some(t) = target {
            self.target = z[t] * inverse;
        }
        let max = self.max.max(row_max(z) * inverse);
        if !max.is_finite() {
            return;
        }
        let (sum, spread) = shifted_sums(z, inverse, max);
        if self.sum > 0.0 {
            // Moving the reference from m to m': e^(u - m') = e^(m - m') e^(u - m), and
            // u - m' = (u - m) + (m - m').
            let (shift, scale) = (f64::from(self.max - max), f64::from(self.max - max).exp());
            self.spread = scale * (self.spread + shift * self.sum);
            self.sum *= scale;
        }
        self.sum += f64::from(sum);
        self.spread += f64::from(spread);
        self.max = max;
    }

    /// [log p(target), entropy, logsumexp].
    fn finish(&self) -> [f32; 3] {
        let log_sum = self.sum.ln();
        let lse = f64::from(self.max) + log_sum;
        [(f64::from(self.target) - lse) as f32, (log_sum - self.spread / self.sum) as f32, lse as f32]
    }
}

/// (Σ e^(z/T - shift), Σ e^(z/T - shift) (z/T - shift)) over a block, eight lanes.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn shifted_sums(z: &[f32], inverse: f32, shift: f32) -> (f32, f32) {
    let (mut sums, mut spreads) = ([0.0f32; 8], [0.0f32; 8]);
    let chunks = z.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for i in 0..8 {
            let d = chunk[i] * inverse - shift;
            let e = exp(d);
            sums[i] += e;
            spreads[i] = e.mul_add(d, spreads[i]);
        }
    }
    let (mut sum, mut spread) = (sums.iter().sum::<f32>(), spreads.iter().sum::<f32>());
    for &v in rest {
        let d = v * inverse - shift;
        let e = exp(d);
        sum += e;
        spread += e * d;
    }
    (sum, spread)
}

/// Turns a block of one row's raw logits `z` into d loss / d z in place. With u = z / T,
/// p = softmax(u), the row's output [log p_t, H, lse] and its gradient [g_l, g_h, g_s]:
///   d log p_t / d u_j = [j = t] - p_j
///   d H / d u_j       = -p_j (log p_j + H) = p_j (E_p[u] - u_j)      (E_p[u] = lse - H)
///   d lse / d u_j     = p_j
/// so d loss / d z_j = (g_l [j = t] + p_j (g_h (E_p[u] - u_j) + g_s - g_l)) / T.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn head_grad_row(z: &mut [f32], inverse: f32, output: &[f32], grad: &[f32], target: Option<usize>) {
    let (lse, entropy) = (output[2], output[1]);
    let (g_l, g_h, g_s) = (grad[0], grad[1], grad[2]);
    let mean = lse - entropy;
    for v in z.iter_mut() {
        let u = *v * inverse;
        let p = exp(u - lse);
        *v = p * (g_h * (mean - u) + g_s - g_l) * inverse;
    }
    if let Some(t) = target {
        z[t] += g_l * inverse;
    }
}

/// `t` with unit stride in its last dimension and no negative strides (a copy only when not).
fn rows_contiguous(t: FlexTensor) -> FlexTensor {
    let strides = t.layout().strides();
    if strides.last() == Some(&1) && strides.iter().all(|s| *s >= 0) { t } else { t.to_contiguous() }
}

/// One query head's attention: scores of `q` against each unmasked key (rows of `keys` at
/// `stride`), softmax, and the weighted sum of the value rows into `out`.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn attend(
    q: &[f32],
    (keys, k_stride): (&[f32], usize),
    (values, v_stride): (&[f32], usize),
    blocked: &[u8],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let dim = q.len();
    for (s, score) in scores.iter_mut().enumerate() {
        *score = if blocked[s] != 0 { f32::NEG_INFINITY } else { dot(q, &keys[s * k_stride..][..dim]) * scale };
    }
    let max = row_max(scores);
    let shift = if max.is_finite() { max } else { 0.0 };
    for v in scores.iter_mut() {
        *v = exp(*v - shift);
    }
    let total = sum(scores);
    let norm = if total > 0.0 { 1.0 / total } else { 0.0 };
    for (s, &weight) in scores.iter().enumerate() {
        if weight != 0.0 {
            let weight = weight * norm;
            for (o, &v) in out.iter_mut().zip(&values[s * v_stride..][..dim]) {
                *o = weight.mul_add(v, *o);
            }
        }
    }
}

/// Eight-lane dot product (vectorises; a plain float sum is sequential).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            lanes[i] = x[i].mul_add(y[i], lanes[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// An autodiff node for a fused op whose backward needs only its output.
macro_rules! from_output {
    ($name:ident, $forward:ident, $backward:ident) => {{
        #[derive(Debug)]
        struct $name;

        impl<B: Backend + FusedOps> Backward<B, 1> for $name {
            type State = B::FloatTensorPrimitive;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let output = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| B::$backward(output, grad));
            }
        }
        |x: FloatTensor<Autodiff<B, C>>| {
            let (primitive, node) = x.into_parts();
            match $name.prepare::<C>([node]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let output = B::$forward(primitive);
                    prep.finish(output.clone(), output)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::$forward(primitive)),
            }
        }
    }};
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

    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        from_output!(SoftmaxLast, softmax_last, softmax_last_backward)(x)
    }

    fn softmax_last_backward(_y: FloatTensor<Self>, _grad: FloatTensor<Self>) -> FloatTensor<Self> {
        unimplemented!("softmax has no second derivative here")
    }

    fn log_softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        from_output!(LogSoftmaxLast, log_softmax_last, log_softmax_last_backward)(x)
    }

    fn log_softmax_last_backward(_y: FloatTensor<Self>, _grad: FloatTensor<Self>) -> FloatTensor<Self> {
        unimplemented!("log-softmax has no second derivative here")
    }

    fn packed_linear(_x: FloatTensor<Self>, _packed: FloatTensor<Self>) -> FloatTensor<Self> {
        unimplemented!("packed weights are for inference: `fused_packed_linear` never sends autodiff tensors")
    }

    fn decode_attention(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _blocked: BoolTensor<Self>,
        _scale: f32,
    ) -> FloatTensor<Self> {
        unimplemented!("decode attention is for inference: `fused_decode_attention` never sends autodiff tensors")
    }

    fn head_log_probs(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        transposed: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct HeadLogProbs;

        impl<B: Backend + FusedOps> Backward<B, 2> for HeadLogProbs {
            // Inputs, targets, output, temperature, transposed: the logits are recomputed.
            type State = (
                B::FloatTensorPrimitive,
                B::FloatTensorPrimitive,
                B::IntTensorPrimitive,
                B::FloatTensorPrimitive,
                f32,
                bool,
            );

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let (hidden, head, targets, output, temperature, transposed) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let [hidden_node, head_node] = ops.parents;
                // A frozen head (LoRA) gets no gradient, and none is computed.
                let (d_hidden, d_head) = B::head_log_probs_backward(
                    hidden,
                    head,
                    targets,
                    output,
                    grad,
                    temperature,
                    transposed,
                    hidden_node.is_some(),
                    head_node.is_some(),
                );
                if let Some(node) = hidden_node {
                    grads.register::<B>(node.id, d_hidden);
                }
                if let Some(node) = head_node {
                    grads.register::<B>(node.id, d_head);
                }
            }
        }

        let (hidden, hidden_node) = hidden.into_parts();
        let (head, head_node) = head.into_parts();
        match HeadLogProbs.prepare::<C>([hidden_node, head_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::head_log_probs(hidden.clone(), head.clone(), targets.clone(), temperature, transposed);
                prep.finish((hidden, head, targets, output.clone(), temperature, transposed), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::head_log_probs(hidden, head, targets, temperature, transposed)),
        }
    }

    fn head_log_probs_backward(
        _hidden: FloatTensor<Self>,
        _head: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        _output: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _temperature: f32,
        _transposed: bool,
        _want_hidden: bool,
        _want_head: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("the fused head has no second derivative here")
    }

    fn matmul_bf16(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, f32_out: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MatmulBf16;

        impl<B: Backend + FusedOps> Backward<B, 2> for MatmulBf16 {
            type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                use burn::backend::TensorMetadata;
                let (lhs, rhs) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let rank = lhs.shape().num_dims();
                let [lhs_node, rhs_node] = ops.parents;
                // dL/dA = G B^T and dL/dB = A^T G (the transposes as views), each in its
                // operand's dtype; a frozen operand (a LoRA base weight) gets none.
                let (lhs_f32, rhs_f32) = (lhs.dtype() == DType::F32, rhs.dtype() == DType::F32);
                if let Some(node) = rhs_node {
                    let d_rhs = B::matmul_bf16(B::float_swap_dims(lhs, rank - 2, rank - 1), grad.clone(), rhs_f32);
                    grads.register::<B>(node.id, d_rhs);
                }
                if let Some(node) = lhs_node {
                    let d_lhs = B::matmul_bf16(grad, B::float_swap_dims(rhs, rank - 2, rank - 1), lhs_f32);
                    grads.register::<B>(node.id, d_lhs);
                }
            }
        }

        let (lhs, lhs_node) = lhs.into_parts();
        let (rhs, rhs_node) = rhs.into_parts();
        match MatmulBf16.prepare::<C>([lhs_node, rhs_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::matmul_bf16(lhs.clone(), rhs.clone(), f32_out);
                prep.finish((lhs, rhs), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::matmul_bf16(lhs, rhs, f32_out)),
        }
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

/// Softmax over the last dimension in one fused pass per row (with its fused backward under
/// autodiff), or `x` back when it is not an f32 tensor on the CPU backend.
pub fn fused_softmax_last<const N: usize>(x: Tensor<N>) -> Result<Tensor<N>, Tensor<N>> {
    if !served(&x) {
        return Err(x);
    }
    Ok(Tensor::from_dispatch(<Dispatch as FusedOps>::softmax_last(x.into_dispatch())))
}

/// Log-softmax over the last dimension, as [`fused_softmax_last`].
pub fn fused_log_softmax_last<const N: usize>(x: Tensor<N>) -> Result<Tensor<N>, Tensor<N>> {
    if !served(&x) {
        return Err(x);
    }
    Ok(Tensor::from_dispatch(<Dispatch as FusedOps>::log_softmax_last(x.into_dispatch())))
}

/// Softmax over the last dimension: fused on the CPU, burn's op elsewhere.
pub fn softmax_last<const N: usize>(x: Tensor<N>) -> Tensor<N> {
    fused_softmax_last(x).unwrap_or_else(|x| burn::tensor::activation::softmax(x, N - 1))
}

/// Log-softmax over the last dimension: fused on the CPU, burn's op elsewhere.
pub fn log_softmax_last<const N: usize>(x: Tensor<N>) -> Tensor<N> {
    fused_log_softmax_last(x).unwrap_or_else(|x| burn::tensor::activation::log_softmax(x, N - 1))
}

/// Whether `x` is a bf16 tensor on the CPU backend (with or without autodiff) on a CPU that
/// multiplies bf16 natively ([`crate::bf16_gemm::supported`]).
pub fn native_bf16<const N: usize>(x: &Tensor<N>) -> bool {
    x.dtype() == DType::BF16 && x.device() == Device::flex() && crate::bf16_gemm::supported()
}

/// `lhs.matmul(rhs)`; for two bf16 tensors on a CPU with AVX-512 BF16, with bf16 products
/// accumulated in f32 ([`FusedOps::matmul_bf16`]) where flex converts both operands to f32 and
/// back on every call. Batch dimensions must then match (no broadcast).
pub fn matmul<const N: usize>(lhs: Tensor<N>, rhs: Tensor<N>) -> Tensor<N> {
    let native = native_bf16(&lhs) && native_bf16(&rhs);
    native.then(|| matmul_mixed(&lhs, &rhs, false)).flatten().unwrap_or_else(|| lhs.matmul(rhs))
}

/// The native bf16 product ([`FusedOps::matmul_bf16`]) of `lhs` and `rhs` (each bf16, or f32
/// rounded to bf16 as it is read), the result in f32 when `f32_out`, else bf16; `None` (the
/// operands dropped) when either is not on the CPU backend, neither is bf16, the batch
/// dimensions differ, or the CPU lacks AVX-512 BF16. For a product feeding an f32 kernel
/// (attention scores into the fused softmax), as PyTorch's CPU attention accumulates bf16 in f32.
pub fn matmul_mixed<const N: usize>(lhs: &Tensor<N>, rhs: &Tensor<N>, f32_out: bool) -> Option<Tensor<N>> {
    let on_cpu = |t: &Tensor<N>| t.device() == Device::flex() && matches!(t.dtype(), DType::F32 | DType::BF16);
    let (l, r) = (lhs.dims(), rhs.dims());
    let served = N >= 2
        && on_cpu(lhs)
        && on_cpu(rhs)
        && (lhs.dtype() == DType::BF16 || rhs.dtype() == DType::BF16)
        && l[..N - 2] == r[..N - 2]
        && crate::bf16_gemm::supported();
    served.then(|| {
        Tensor::from_dispatch(<Dispatch as FusedOps>::matmul_bf16(
            lhs.clone().into_dispatch(),
            rhs.clone().into_dispatch(),
            f32_out,
        ))
    })
}

/// burn's `linear` (`x` [.., K] times `weight` [K, N], plus `bias` [N]), through [`matmul`]'s
/// native bf16 product when `x` and `weight` are bf16 on such a CPU.
pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    if !(native_bf16(&x) && native_bf16(&weight)) {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let mut dims = x.dims();
    let [depth, features] = weight.dims();
    let rows = dims[..D - 1].iter().product();
    dims[D - 1] = features;
    let y = matmul(x.reshape([rows, depth]), weight);
    let y = match bias {
        Some(bias) => y + bias.unsqueeze::<2>(),
        None => y,
    };
    y.reshape(dims)
}

/// Per row of `hidden` [R, C]: the log-probability of `targets` [R] and the entropy of
/// softmax(hidden · head / temperature), without the [R, V] logits (see
/// [`FusedOps::head_log_probs`]); differentiable w.r.t. `hidden` and `head` (both outputs).
/// `head` is [C, V] (a `Linear` weight), or [V, C] when `transposed` (a tied embedding table).
///
/// Fused on the CPU backend in f32: logits exist [`HEAD_ROWS`] x [`HEAD_VOCAB`] at a time, in
/// the forward pass and again in the backward pass. Elsewhere (GPU backends, bf16) burn's ops
/// per block of [`HEAD_ROWS`] rows, in the head's dtype.
///
/// # Shapes
/// - returns (log_probs [R], entropies [R])
pub fn head_log_probs(
    hidden: Tensor<2>,
    head: Tensor<2>,
    transposed: bool,
    targets: Tensor<1, Int>,
    temperature: f32,
) -> (Tensor<1>, Tensor<1>) {
    let rows = hidden.dims()[0];
    // f32 hidden states and an f32 head, or a bf16 head on a CPU that multiplies bf16 natively.
    if served(&hidden) && (served(&head) || native_bf16(&head)) {
        let out = Tensor::<2>::from_dispatch(<Dispatch as FusedOps>::head_log_probs(
            hidden.into_dispatch(),
            head.into_dispatch(),
            targets.into_dispatch(),
            temperature,
            transposed,
        )); // [R, 3]
        return (out.clone().slice([0..rows, 0..1]).reshape([rows]), out.slice([0..rows, 1..2]).reshape([rows]));
    }
    let head = if transposed { head.transpose() } else { head }; // [C, V]
    let dtype = head.dtype();
    let (mut log_probs, mut entropies) = (Vec::new(), Vec::new());
    for range in blocks(rows, HEAD_ROWS) {
        let logits =
            hidden.clone().slice([range.clone()]).cast(dtype).matmul(head.clone()).cast(burn::tensor::FloatDType::F32)
                / temperature; // [r, V]
        let log_p = log_softmax_last(logits);
        let chosen = targets.clone().slice([range.clone()]).reshape([range.len(), 1]);
        log_probs.push(log_p.clone().gather(1, chosen).reshape([range.len()]));
        entropies.push(-(log_p.clone().exp() * log_p).sum_dim(1).reshape([range.len()]));
    }
    (Tensor::cat(log_probs, 0), Tensor::cat(entropies, 0))
}

/// Output features per strip of a packed weight (two AVX2 registers).
const STRIP: usize = 16;

/// Packs a linear layer's weight [K, N] (burn's `Linear` layout) and bias [N] for
/// [`fused_packed_linear`]: [S, K + 1, 16] with S = ceil(N / 16), strip `s` holding output
/// features 16 s .. 16 s + 16 row by row (the bias as row K, zero padding past N). A strip is then
/// one sequential read: multiplying a few rows by a weight in burn's layout reads each strip
/// 64 bytes per input feature at a stride of N floats, which at decode time (16-row batches,
/// weights streamed from L3) ran at 20-30 GFLOP/s against 70 for weights already in cache.
/// `transposed` reads `weight` as [N, K] (a tied head's embedding table).
pub fn pack_linear(
    weight: &[f32],
    depth: usize,
    features: usize,
    bias: Option<&[f32]>,
    transposed: bool,
) -> TensorData {
    assert_eq!(weight.len(), depth * features, "pack_linear: weight size");
    let strips = features.div_ceil(STRIP);
    let mut packed = vec![0.0f32; strips * (depth + 1) * STRIP];
    for (s, strip) in packed.chunks_exact_mut((depth + 1) * STRIP).enumerate() {
        for (k, row) in strip.chunks_exact_mut(STRIP).enumerate() {
            for (j, slot) in row.iter_mut().enumerate() {
                let n = s * STRIP + j;
                if n >= features {
                    continue;
                }
                *slot = match (k == depth, transposed) {
                    (true, _) => bias.map_or(0.0, |b| b[n]),
                    (false, false) => weight[k * features + n],
                    (false, true) => weight[n * depth + k],
                };
            }
        }
    }
    TensorData::new(packed, [strips, depth + 1, STRIP])
}

/// `x` [.., K] times a weight packed by [`pack_linear`], plus its bias: [.., N] where the
/// packed weight has N ≤ 16 S features (the caller narrows the padding away). `x` is handed
/// back when it is not an f32 tensor on the plain CPU backend (autodiff tensors included).
pub fn fused_packed_linear<const N: usize>(x: Tensor<N>, packed: &Tensor<3>) -> Result<Tensor<N>, Tensor<N>> {
    if !served(&x) || x.device().is_autodiff() || !served(packed) || packed.device().is_autodiff() {
        return Err(x);
    }
    Ok(Tensor::from_dispatch(<Dispatch as FusedOps>::packed_linear(x.into_dispatch(), packed.clone().into_dispatch())))
}

/// Attention of one new position per sequence over the cached keys and values (see
/// [`FusedOps::decode_attention`]), or the query back when the tensors are not f32 on the plain
/// CPU backend or there is more than one query position.
pub fn fused_decode_attention(
    query: Tensor<4>,
    key: &Tensor<4>,
    value: &Tensor<4>,
    blocked: &Tensor<4, Bool>,
    scale: f32,
) -> Result<Tensor<4>, Tensor<4>> {
    let plain = |t: &Tensor<4>| served(t) && !t.device().is_autodiff();
    if query.dims()[2] != 1 || !plain(&query) || !plain(key) || !plain(value) {
        return Err(query);
    }
    Ok(Tensor::from_dispatch(<Dispatch as FusedOps>::decode_attention(
        query.into_dispatch(),
        key.clone().into_dispatch(),
        value.clone().into_dispatch(),
        blocked.clone().into_dispatch(),
        scale,
    )))
}

/// Rows per parallel task of a large packed product (a multiple of the kernel's six).
const PACKED_ROWS_PER_TASK: usize = 96;

/// out[r, 16 s + j] = Σ_k x[r, k] w_s[k, j] + w_s[K, j] for every row `r` and strip `s`; many
/// rows (a prompt step) are split into parallel tasks of [`PACKED_ROWS_PER_TASK`] rows.
fn packed_linear_rows(x: &[f32], rows: usize, depth: usize, packed: &[f32], strips: usize, out: &mut [f32]) {
    let width = strips * STRIP;
    if rows <= PACKED_ROWS_PER_TASK || depth == 0 {
        return packed_linear_block(x, rows, depth, packed, strips, out);
    }
    out.par_chunks_mut(PACKED_ROWS_PER_TASK * width).zip(x.par_chunks(PACKED_ROWS_PER_TASK * depth)).for_each(
        |(out, x)| {
            packed_linear_block(x, x.len() / depth, depth, packed, strips, out);
        },
    );
}

fn packed_linear_block(x: &[f32], rows: usize, depth: usize, packed: &[f32], strips: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the slices have the sizes the
        // kernel indexes (rows * depth, strips * (depth + 1) * 16 and rows * strips * 16).
        unsafe { avx2::packed_linear_rows(x, rows, depth, packed, strips, out) };
        return;
    }
    let width = strips * STRIP;
    for (s, strip) in packed.chunks_exact((depth + 1) * STRIP).enumerate() {
        for r in 0..rows {
            let mut acc = [0.0f32; STRIP];
            for k in 0..depth {
                let v = x[r * depth + k];
                for (a, &w) in acc.iter_mut().zip(&strip[k * STRIP..(k + 1) * STRIP]) {
                    *a += v * w;
                }
            }
            for (j, a) in acc.iter().enumerate() {
                out[r * width + s * STRIP + j] = a + strip[depth * STRIP + j];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::STRIP;

    /// Six rows at a time (12 accumulators, two weight registers and a broadcast: 15 of the 16
    /// registers), each strip read sequentially and reused by every block of rows. Each output
    /// is one FMA chain over k from zero, then the bias added, as gemm's kernel and burn's
    /// `Linear` compute it.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn packed_linear_rows(
        x: &[f32],
        rows: usize,
        depth: usize,
        packed: &[f32],
        strips: usize,
        out: &mut [f32],
    ) {
        assert!(
            x.len() >= rows * depth
                && packed.len() >= strips * (depth + 1) * STRIP
                && out.len() >= rows * strips * STRIP
        );
        let width = strips * STRIP;
        for s in 0..strips {
            // SAFETY (all pointer arithmetic below): in bounds by the assertion above.
            unsafe {
                let w = packed.as_ptr().add(s * (depth + 1) * STRIP);
                let mut r = 0;
                while r < rows {
                    let x = x.as_ptr().add(r * depth);
                    let out = out.as_mut_ptr().add(r * width + s * STRIP);
                    match rows - r {
                        1 => block::<1>(x, depth, w, out, width),
                        2 => block::<2>(x, depth, w, out, width),
                        3 => block::<3>(x, depth, w, out, width),
                        4 => block::<4>(x, depth, w, out, width),
                        5 => block::<5>(x, depth, w, out, width),
                        _ => block::<6>(x, depth, w, out, width),
                    }
                    r += 6;
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const R: usize>(x: *const f32, depth: usize, w: *const f32, out: *mut f32, width: usize) {
        // SAFETY: the caller passes R rows of `depth` inputs, a strip of depth + 1 rows of 16
        // and R output rows of `width`.
        unsafe {
            let mut low = [_mm256_setzero_ps(); R];
            let mut high = [_mm256_setzero_ps(); R];
            for k in 0..depth {
                let w_low = _mm256_loadu_ps(w.add(k * STRIP));
                let w_high = _mm256_loadu_ps(w.add(k * STRIP + 8));
                for i in 0..R {
                    let v = _mm256_broadcast_ss(&*x.add(i * depth + k));
                    low[i] = _mm256_fmadd_ps(v, w_low, low[i]);
                    high[i] = _mm256_fmadd_ps(v, w_high, high[i]);
                }
            }
            let (b_low, b_high) = (_mm256_loadu_ps(w.add(depth * STRIP)), _mm256_loadu_ps(w.add(depth * STRIP + 8)));
            for i in 0..R {
                _mm256_storeu_ps(out.add(i * width), _mm256_add_ps(low[i], b_low));
                _mm256_storeu_ps(out.add(i * width + 8), _mm256_add_ps(high[i], b_high));
            }
        }
    }
}

/// Applies `kernel(row, grad_row, out_row)` to every row (last dimension) of `x`, rows split
/// into parallel chunks.
fn map_rows(
    x: &FlexTensor,
    grad: Option<&FlexTensor>,
    kernel: impl Fn(&[f32], Option<&[f32]>, &mut [f32]) + Sync,
) -> FlexTensor {
    let width = x.layout().shape().as_slice().last().copied().unwrap_or(1).max(1);
    let rows_per_chunk = (CHUNK / width).max(1);
    map(
        x,
        grad,
        |x, grad, out| {
            // `map` hands over whole chunks of CHUNK elements; rows must not straddle them, so the
            // row loop runs inside a chunk of whole rows.
            for (i, (x, out)) in x.chunks(width).zip(out.chunks_mut(width)).enumerate() {
                kernel(x, grad.map(|g| &g[i * width..(i + 1) * width]), out);
            }
        },
        rows_per_chunk * width,
    )
}

/// Applies `kernel(x, grad, out)` over contiguous copies of `x` (and `grad`) in parallel chunks.
fn map(
    x: &FlexTensor,
    grad: Option<&FlexTensor>,
    kernel: impl Fn(&[f32], Option<&[f32]>, &mut [f32]) + Sync,
    chunk: usize,
) -> FlexTensor {
    let x = x.to_contiguous();
    let grad = grad.map(FlexTensor::to_contiguous);
    let shape = x.layout().shape().clone();
    let input = x.as_slice::<f32>().expect("contiguous f32");
    let grad = grad.as_ref().map(|g| g.as_slice::<f32>().expect("contiguous f32"));
    let mut out = vec![0.0f32; input.len()];
    if input.len() <= chunk {
        kernel(input, grad, &mut out);
    } else {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, out)| {
            let range = i * chunk..i * chunk + out.len();
            kernel(&input[range.clone()], grad.map(|g| &g[range]), out);
        });
    }
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// e^x, Cephes' `expf` polynomial: relative error about 2e-7 on [-87, 88], 0 below (where e^x
/// is subnormal, and for -inf), e^88 above; branch-free so that loops over it vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5e-1);
    let y = p.mul_add(r * r, r) + 1.0;
    // SAFETY: n is an integer in [-126, 127] after the clamp, so the conversion is exact (and
    // compiles to one vector instruction, where `as` adds saturation checks).
    let exponent = unsafe { n.to_int_unchecked::<i32>() } + 127;
    let value = y * f32::from_bits((exponent as u32) << 23);
    if underflow { 0.0 } else { value }
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

/// Eight-lane accumulation, so that reductions vectorise (a plain float sum is sequential).
#[inline(always)]
fn reduce(x: &[f32], init: f32, combine: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = combine(*lane, v);
        }
    }
    rest.iter().fold(lanes.into_iter().fold(init, &combine), |a, &v| combine(a, v))
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    reduce(x, 0.0, |a, b| a + b)
}

/// Largest element, -inf for an empty row.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    reduce(x, f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn softmax_row(x: &[f32], out: &mut [f32]) {
    // A row of -inf (fully masked) has no finite maximum: shift by 0 and give zeros.
    let max = row_max(x);
    let shift = if max.is_finite() { max } else { 0.0 };
    for (o, &x) in out.iter_mut().zip(x) {
        *o = exp(x - shift);
    }
    let total = sum(out);
    let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
    out.iter_mut().for_each(|o| *o *= scale);
}

#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn softmax_backward_row(y: &[f32], grad: &[f32], out: &mut [f32]) {
    for ((o, &y), &g) in out.iter_mut().zip(y).zip(grad) {
        *o = y * g;
    }
    let dot = sum(out);
    for ((o, &y), &g) in out.iter_mut().zip(y).zip(grad) {
        *o = y * (g - dot);
    }
}

#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn log_softmax_row(x: &[f32], out: &mut [f32]) {
    let max = row_max(x);
    let shift = if max.is_finite() { max } else { 0.0 };
    for (o, &x) in out.iter_mut().zip(x) {
        *o = exp(x - shift);
    }
    let log_sum = shift + sum(out).ln();
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x - log_sum;
    }
}

#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn log_softmax_backward_row(y: &[f32], grad: &[f32], out: &mut [f32]) {
    let total = sum(grad);
    for ((o, &y), &g) in out.iter_mut().zip(y).zip(grad) {
        *o = g - exp(y) * total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_its_range_and_zero_below() {
        for i in -870..=880 {
            let x = i as f32 * 0.1;
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            assert!(((got - want) / want).abs() < 5e-7, "exp({x}) = {got}, expected {want}");
        }
        assert_eq!((exp(-1000.0), exp(f32::NEG_INFINITY)), (0.0, 0.0));
        assert!(exp(1000.0).is_finite());
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
        let weights = Tensor::<1>::from_data(
            TensorData::new((0..values.len()).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(), [values.len()]),
            &device,
        );
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

    /// Fused and burn's softmax / log-softmax agree in values and gradients, on rows with
    /// masked (-inf) entries too.
    #[test]
    fn fused_softmaxes_match_burns() {
        let device = Device::flex().autodiff();
        let (rows, width) = (300, 70);
        let values: Vec<f32> = (0..rows * width)
            .map(|i| if i % 11 == 3 { f32::NEG_INFINITY } else { ((i * 37 % 101) as f32 - 50.0) * 0.13 })
            .collect();
        let x = || Tensor::<2>::from_data(TensorData::new(values.clone(), [rows, width]), &device).require_grad();
        let weights = Tensor::<2>::from_data(
            TensorData::new((0..rows * width).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(), [rows, width]),
            &device,
        );
        let close = |a: Tensor<2>, b: Tensor<2>, what: &str| {
            let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
            let worst = a
                .iter()
                .zip(&b)
                .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() / (1.0 + b.abs()) })
                .fold(0.0f32, f32::max);
            assert!(worst < 2e-6, "{what}: worst relative difference {worst}");
        };
        type Op = fn(Tensor<2>) -> Tensor<2>;
        let cases: [(&str, Op, Op); 2] = [
            ("softmax", |x| fused_softmax_last(x).unwrap(), |x| burn::tensor::activation::softmax(x, 1)),
            ("log_softmax", |x| fused_log_softmax_last(x).unwrap(), |x| burn::tensor::activation::log_softmax(x, 1)),
        ];
        for (name, fused, reference) in cases {
            let (a, b) = (x(), x());
            let (fa, rb) = (fused(a.clone()), reference(b.clone()));
            // Masked entries: probability exactly 0 (log-probability -inf).
            let masked = fa.clone().into_data().try_to_vec::<f32>().unwrap()[3];
            assert!(masked == 0.0 || masked == f32::NEG_INFINITY, "{name}: masked entry {masked}");
            // Gradients through finite outputs only (log-softmax is -inf where masked).
            let finite = |t: Tensor<2>| t.clone().mask_fill(t.is_inf(), 0.0);
            let ga = (finite(fa.clone()) * weights.clone()).sum().backward();
            let gb = (finite(rb.clone()) * weights.clone()).sum().backward();
            close(finite(fa), finite(rb), name);
            close(a.grad(&ga).unwrap(), b.grad(&gb).unwrap(), name);
        }
        // A fully masked row gives zeros, not NaN.
        let row = Tensor::<2>::from_data(TensorData::new(vec![f32::NEG_INFINITY; 4], [1, 4]), &Device::flex());
        assert_eq!(fused_softmax_last(row).unwrap().into_data().try_to_vec::<f32>().unwrap(), vec![0.0; 4]);
    }

    /// The packed kernel gives what burn's matmul and bias give, for every tail of rows (blocks
    /// of six), a feature count that is not a multiple of 16, and a transposed (tied) table.
    #[test]
    fn packed_linear_matches_matmul_plus_bias() {
        let device = Device::flex();
        let (depth, features) = (37, 45);
        let weight: Vec<f32> = (0..depth * features).map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01).collect();
        let bias: Vec<f32> = (0..features).map(|i| i as f32 * 0.1 - 2.0).collect();
        let w = Tensor::<2>::from_data(TensorData::new(weight.clone(), [depth, features]), &device);
        let b = Tensor::<1>::from_data(TensorData::new(bias.clone(), [features]), &device);
        let table: Vec<f32> = w.clone().transpose().into_data().try_to_vec::<f32>().unwrap(); // [N, K]
        let packed = Tensor::<3>::from_data(pack_linear(&weight, depth, features, Some(&bias), false), &device);
        let tied = Tensor::<3>::from_data(pack_linear(&table, depth, features, Some(&bias), true), &device);
        for rows in 1..=13 {
            let x = Tensor::<3>::from_data(
                TensorData::new(
                    (0..rows * depth).map(|i| ((i * 17 % 23) as f32 - 11.0) * 0.1).collect::<Vec<_>>(),
                    [1, rows, depth],
                ),
                &device,
            );
            let want = (x.clone().matmul(w.clone().unsqueeze()) + b.clone().unsqueeze())
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            for packed in [&packed, &tied] {
                let got = fused_packed_linear(x.clone(), packed).unwrap().narrow(2, 0, features);
                assert_eq!(got.dims(), [1, rows, features]);
                let got = got.into_data().try_to_vec::<f32>().unwrap();
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst < 1e-5, "{rows} rows: worst difference {worst}");
            }
        }
        // Autodiff tensors are handed back (the kernel has no backward pass).
        let x = Tensor::<2>::zeros([2, depth], &device.clone().autodiff());
        assert!(fused_packed_linear(x, &packed).is_err());
    }

    /// The fused decoding attention gives what the composed ops give, with grouped key/value
    /// heads, masked keys and keys read through a narrowed (strided) cache buffer.
    #[test]
    fn decode_attention_matches_the_composed_ops() {
        let device = Device::flex();
        let (batch, heads, kv_heads, keys, dim, capacity) = (3, 4, 2, 7, 12, 10);
        let values = |n: usize, seed: usize| (0..n).map(|i| ((i * seed % 41) as f32 - 20.0) * 0.05).collect::<Vec<_>>();
        let query =
            Tensor::<4>::from_data(TensorData::new(values(batch * heads * dim, 7), [batch, heads, 1, dim]), &device);
        let buffer = |seed| {
            Tensor::<4>::from_data(
                TensorData::new(values(batch * kv_heads * capacity * dim, seed), [batch, kv_heads, capacity, dim]),
                &device,
            )
        };
        let (key, value) = (buffer(11).narrow(2, 0, keys), buffer(13).narrow(2, 0, keys));
        let blocked: Vec<bool> = (0..batch * keys).map(|i| i % keys < i / keys || i % 5 == 4).collect();
        let blocked = Tensor::<4, Bool>::from_data(TensorData::new(blocked, [batch, 1, 1, keys]), &device);
        let fused = fused_decode_attention(query.clone(), &key, &value, &blocked, 0.3).unwrap();
        // The composed path, as `layers::attention` computes it for several query positions.
        let two = Tensor::cat(vec![query.clone(), query], 2);
        let composed = crate::layers::attention(two, key, value, Tensor::cat(vec![blocked.clone(), blocked], 2), 0.3)
            .narrow(2, 0, 1);
        let (a, b) =
            (fused.into_data().try_to_vec::<f32>().unwrap(), composed.into_data().try_to_vec::<f32>().unwrap());
        let worst = a.iter().zip(&b).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "worst difference {worst}");
    }

    #[test]
    fn other_devices_and_dtypes_are_not_served() {
        let x = Tensor::<1>::from_floats([1.0, 2.0], &Device::flex()).cast(burn::tensor::FloatDType::BF16);
        assert!(fused_gelu_new(x).is_err());
    }

    /// The native bf16 product (batched, with a transposed operand, and its mixed f32 form)
    /// agrees with flex's own bf16 product in values and in both operands' gradients, each
    /// within one bf16 rounding of the result (both accumulate in f32, in different orders).
    #[test]
    fn native_bf16_matmul_matches_flex_bf16_values_and_gradients() {
        if !crate::bf16_gemm::supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        use burn::tensor::FloatDType::{BF16, F32};
        let device = Device::flex().autodiff();
        let (b, m, k, n) = (3, 37, 70, 45);
        let fill = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| (((i * 7919 + seed * 104_729) % 1999) as f32 / 1999.0 - 0.5) * 2.0).collect()
        };
        let leaf = |values: &[f32], dims: [usize; 3]| {
            Tensor::<3>::from_data(TensorData::new(values.to_vec(), dims), &device).cast(BF16).detach().require_grad()
        };
        let (a_values, bt_values, w_values) = (fill(b * m * k, 1), fill(b * n * k, 2), fill(b * m * n, 3));
        let weights = Tensor::<3>::from_data(TensorData::new(w_values, [b, m, n]), &device);
        let run = |native: bool| {
            let (a, bt) = (leaf(&a_values, [b, m, k]), leaf(&bt_values, [b, n, k]));
            let rhs = bt.clone().swap_dims(1, 2); // [b, k, n], a strided view
            let out = if native { matmul(a.clone(), rhs) } else { a.clone().matmul(rhs) };
            let grads = (out.clone().cast(F32) * weights.clone()).sum().backward();
            let grad =
                |t: &Tensor<3>| t.grad(&grads).expect("a gradient").cast(F32).into_data().try_to_vec::<f32>().unwrap();
            (out.cast(F32).into_data().try_to_vec::<f32>().unwrap(), grad(&a), grad(&bt))
        };
        let (native, flex) = (run(true), run(false));
        let close = |x: &[f32], y: &[f32], what: &str| {
            for (x, y) in x.iter().zip(y) {
                assert!((x - y).abs() <= 2.0f32.powi(-7) * y.abs() + 1e-6, "{what}: {x} vs {y}");
            }
        };
        close(&native.0, &flex.0, "values");
        close(&native.1, &flex.1, "lhs gradient");
        close(&native.2, &flex.2, "rhs gradient");
        // An f32 result is the same product before its rounding to bf16.
        let (a, bt) = (leaf(&a_values, [b, m, k]), leaf(&bt_values, [b, n, k]));
        let wide =
            matmul_mixed(&a, &bt.swap_dims(1, 2), true).expect("served").into_data().try_to_vec::<f32>().unwrap();
        let rounded: Vec<f32> = wide.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect();
        assert_eq!(rounded, native.0, "an f32 result rounds to the bf16 one");
        assert!(wide.iter().zip(&native.0).any(|(x, y)| x != y), "the f32 result is not rounded");
    }
}
