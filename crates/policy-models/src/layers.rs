//! Small pieces the architectures share: step inputs and attention masks, scaled dot-product
//! attention with grouped-query heads, rotary position embeddings in Hugging Face's rotate-half
//! layout, `gelu_new`, and the key/value cache.
//!
//! Legend: `B` batch, `T` new positions in this step, `S` all key positions (cache + new),
//! `H` query heads, `K` key/value heads, `D` head dimension, `C` model width.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::module::ParamId;
use burn::nn::Linear;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

/// One forward step's inputs, on the host. Sequences are left-padded: padding comes first and
/// `key_mask` marks it false.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInput {
    /// `B`.
    pub batch_size: usize,
    /// Token ids of the new positions, row-major [B, T].
    pub input_ids: Vec<i64>,
    /// Position ids of the new positions [B, T]: the count of real tokens before each one, so
    /// padding does not shift positions.
    pub position_ids: Vec<i64>,
    /// Whether each key position (cache and new) is a real token, [B, S].
    pub key_mask: Vec<bool>,
}

impl StepInput {
    /// A full (uncached) step over left-padded rows of equal length, with the position ids
    /// Hugging Face's `generate` uses.
    ///
    /// # Panics
    /// When rows differ in length or a mask row does not match its ids.
    pub fn from_padded(input_ids: &[Vec<i64>], attention_mask: &[Vec<bool>]) -> Self {
        let batch_size = input_ids.len();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut key_mask = Vec::new();
        let length = input_ids.first().map_or(0, Vec::len);
        for (row, mask) in input_ids.iter().zip(attention_mask) {
            assert!(row.len() == length && mask.len() == length, "rows must be padded to one length");
            let mut real = 0i64;
            for (&id, &keep) in row.iter().zip(mask) {
                ids.push(id);
                // Padding gets position 1, as in transformers; its outputs are never read.
                positions.push(if keep { real } else { 1 });
                real += i64::from(keep);
                key_mask.push(keep);
            }
        }
        Self { batch_size, input_ids: ids, position_ids: positions, key_mask }
    }

    /// `T`.
    pub fn seq_len(&self) -> usize {
        self.input_ids.len() / self.batch_size.max(1)
    }

    /// `S`.
    pub fn key_len(&self) -> usize {
        self.key_mask.len() / self.batch_size.max(1)
    }

    /// The ids as an int tensor [B, T].
    pub fn ids_tensor(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(self.input_ids.clone(), [self.batch_size, self.seq_len()]), device)
    }

    /// The position ids as an int tensor [B, T].
    pub fn positions_tensor(&self, device: &Device) -> Tensor<2, Int> {
        Tensor::from_data(TensorData::new(self.position_ids.clone(), [self.batch_size, self.seq_len()]), device)
    }

    /// Which scores to block, [B, 1, T, S] (true = blocked): keys that are padding, keys after
    /// the query (causal), and with `window`, keys `window` or more positions before the query
    /// (GPT-Neo's local attention). A padding query, which would see nothing, sees itself: no row
    /// is fully blocked, so blocked scores can be -inf (its outputs are never read).
    pub fn blocked_mask(&self, window: Option<usize>, device: &Device) -> Tensor<4, Bool> {
        let (batch, queries, keys) = (self.batch_size, self.seq_len(), self.key_len());
        let past = keys - queries;
        let mut blocked = Vec::with_capacity(batch * queries * keys);
        for b in 0..batch {
            for t in 0..queries {
                let query_index = past + t;
                for j in 0..keys {
                    let visible = (self.key_mask[b * keys + j]
                        && j <= query_index
                        && window.is_none_or(|window| query_index - j < window))
                        || j == query_index;
                    blocked.push(!visible);
                }
            }
        }
        Tensor::from_data(TensorData::new(blocked, [batch, 1, queries, keys]), device)
    }
}

/// Scaled dot-product attention with grouped-query heads.
///
/// # Shapes
/// - `query`: [B, H, T, D]; `key`, `value`: [B, K, S, D] with H a multiple of K (query heads
///   `h` use key/value head `h / (H / K)`, as transformers' `repeat_kv`);
/// - `blocked`: [B, 1, T, S], true where a score is masked;
/// - output: [B, H, T, D].
pub fn attention(
    query: Tensor<4>,
    key: Tensor<4>,
    value: Tensor<4>,
    blocked: Tensor<4, Bool>,
    scale: f32,
) -> Tensor<4> {
    // A decoding step (one query per sequence) on the CPU: one fused pass per head.
    let query = match crate::fused::fused_decode_attention(query, &key, &value, &blocked, scale) {
        Ok(attended) => return attended,
        Err(query) => query,
    };
    let [batch, heads, queries, head_dim] = query.dims();
    let kv_heads = key.dims()[1];
    let group = heads / kv_heads;
    // Fold each group's query heads into the time axis so one matmul serves the whole group
    // without copying the keys: [B, K, G*T, D].
    let query = query.reshape([batch, kv_heads, group * queries, head_dim]);
    let key = key.swap_dims(2, 3);
    // bf16 on a CPU with AVX-512 BF16: scores and softmax in f32 (the fused kernels), the
    // products in bf16, as PyTorch's CPU attention does for bf16.
    let native = crate::fused::native_bf16(&query) && crate::fused::native_bf16(&key);
    let scores = match native.then(|| crate::fused::matmul_mixed(&query, &key, true)).flatten() {
        Some(scores) => scores,
        None => query.matmul(key),
    } * scale; // [B, K, G*T, S]
    let keys = scores.dims()[3];
    let blocked = if group > 1 { blocked.repeat_dim(2, group) } else { blocked }; // [B, 1, G*T, S]
    // -inf, as no row is fully blocked: exp(-inf) is libm's fast path, where a large finite
    // value took its underflow path (errno and all) on half the scores of a causal mask.
    let scores = scores.mask_fill(blocked.expand([batch, kv_heads, group * queries, keys]), f32::NEG_INFINITY);
    let weights = crate::fused::softmax_last(scores);
    let attended = match native.then(|| crate::fused::matmul_mixed(&weights, &value, false)).flatten() {
        Some(attended) => attended,
        None => weights.matmul(value),
    };
    attended.reshape([batch, heads, queries, head_dim])
}

/// transformers' `gelu_new` (the tanh approximation of GELU): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
/// computed as x · sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), the same function (0.5 (1 + tanh y) =
/// sigmoid(2y)): flex evaluates tanh with a scalar libm call per element (17% of a supervised
/// step in a perf profile), sigmoid with one exp. On the CPU backend in f32 it is one fused
/// kernel with a vectorised exp ([`crate::fused`]); elsewhere composed tensor ops.
pub fn gelu_new<const N: usize>(x: Tensor<N>) -> Tensor<N> {
    crate::fused::fused_gelu_new(x).unwrap_or_else(gelu_new_composed)
}

/// [`gelu_new`] from ordinary tensor ops.
pub(crate) fn gelu_new_composed<const N: usize>(x: Tensor<N>) -> Tensor<N> {
    // x^3 as two products: powi_scalar goes through a scalar powf per element.
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube * 0.044715) * (2.0 * (2.0f32 / std::f32::consts::PI).sqrt());
    x * sigmoid(inner)
}

/// Rotary position embeddings in the rotate-half layout of Hugging Face checkpoints (the first
/// and second halves of each head are the pairs; burn's `RotaryEncoding` pairs neighbours).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Inverse frequencies, D/2 of them, after any scaling.
    pub inv_freq: Vec<f32>,
}

/// Llama 3's rope scaling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// How much longer the context is than the original (8 for Llama 3.2).
    pub factor: f64,
    /// Wavelengths above original / low_freq_factor are divided by `factor`.
    pub low_freq_factor: f64,
    /// Wavelengths below original / high_freq_factor are kept.
    pub high_freq_factor: f64,
    /// The context length the model was first trained on.
    pub original_max_position_embeddings: f64,
}

impl Rope {
    /// The default inverse frequencies 1 / base^(2i / D), computed in f32 as transformers does.
    pub fn new(head_dim: usize, base: f64) -> Self {
        let inv_freq = (0..head_dim / 2).map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        Self { inv_freq }
    }

    /// With Llama 3 scaling: low frequencies divided by `factor`, high ones kept, and a smooth
    /// interpolation between (transformers' `_compute_llama3_parameters`).
    pub fn llama3(head_dim: usize, base: f64, scaling: Llama3Scaling) -> Self {
        let Llama3Scaling { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: original } =
            scaling;
        let low_freq_wavelen = original / low_freq_factor;
        let high_freq_wavelen = original / high_freq_factor;
        let inv_freq = Self::new(head_dim, base)
            .inv_freq
            .into_iter()
            .map(|frequency| {
                let frequency = f64::from(frequency);
                let wavelen = 2.0 * std::f64::consts::PI / frequency;
                let scaled = if wavelen > low_freq_wavelen { frequency / factor } else { frequency };
                let medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
                if medium {
                    let smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                } else {
                    scaled as f32
                }
            })
            .collect();
        Self { inv_freq }
    }

    /// cos and sin of the rotation angles for `position_ids` [B, T], each [B, 1, T, D]
    /// (the halves repeated, as transformers' `cat((freqs, freqs), -1)`).
    pub fn cos_sin(&self, position_ids: Tensor<2, Int>) -> (Tensor<4>, Tensor<4>) {
        let device = position_ids.device();
        let [batch, length] = position_ids.dims();
        let half = self.inv_freq.len();
        let inv_freq: Tensor<3> = Tensor::from_data(TensorData::new(self.inv_freq.clone(), [1, 1, half]), &device);
        let angles = position_ids.float().reshape([batch, length, 1]) * inv_freq; // [B, T, D/2]
        let angles = Tensor::cat(vec![angles.clone(), angles], 2).reshape([batch, 1, length, 2 * half]);
        (angles.clone().cos(), angles.sin())
    }

    /// Rotates `x` [B, heads, T, D] by the angles of [`Rope::cos_sin`].
    pub fn apply(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
        let [batch, heads, length, head_dim] = x.dims();
        let half = head_dim / 2;
        let first = x.clone().slice([0..batch, 0..heads, 0..length, 0..half]);
        let second = x.clone().slice([0..batch, 0..heads, 0..length, half..head_dim]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        // The tables are f32; a model computing in bf16 rotates in bf16.
        let dtype = x.dtype();
        x * cos.cast(dtype) + rotated * sin.cast(dtype)
    }
}

/// Keys and values of one attention layer for the positions seen so far.
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// [B, K, capacity, D]; positions from `len` on are unused.
    pub key: Tensor<4>,
    /// [B, K, capacity, D]
    pub value: Tensor<4>,
    /// Positions filled.
    pub len: usize,
}

/// The key/value cache of a whole model: one entry per layer, filled by the first forward
/// step and extended by each later one.
///
/// Each layer's buffer has room to spare (it doubles when full) and a step writes its keys and
/// values in place: growing by concatenation copied the whole cache every decoding step (15% of
/// a d=256 generation profile). The attention reads a narrowed view, which flex's strided matmul
/// takes without a copy.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    packed: Option<Arc<PackedWeights>>,
}

/// Linear weights packed for generation ([`crate::fused::pack_linear`]), each packed the first
/// time a step uses it and shared by the threads of one generation. Valid only while the
/// model's weights do not change: [`crate::generate::generate`] makes one per call.
#[derive(Debug, Default)]
pub struct PackedWeights {
    weights: Mutex<HashMap<ParamId, Option<(Tensor<3>, usize)>>>,
    /// bf16 weights packed for [`crate::bf16_gemm::matmul_packed`] on CPUs with AVX-512 BF16.
    bf16: Mutex<HashMap<ParamId, Option<Arc<crate::bf16_gemm::PackedB>>>>,
}

impl PackedWeights {
    /// The packed weight of parameter `id` and its output features, packing `weight` ([K, N],
    /// or [N, K] when `transposed`) and `bias` on first use; `None` for weights the kernel does
    /// not serve (not f32 on the plain CPU backend).
    fn get(
        &self,
        id: ParamId,
        weight: impl FnOnce() -> (Tensor<2>, Option<Tensor<1>>),
        transposed: bool,
    ) -> Option<(Tensor<3>, usize)> {
        let mut weights = self.weights.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        weights
            .entry(id)
            .or_insert_with(|| {
                let (weight, bias) = weight();
                let device = weight.device();
                if weight.dtype() != DType::F32 || device != Device::flex() || device.is_autodiff() {
                    return None;
                }
                let [rows, columns] = weight.dims();
                let (depth, features) = if transposed { (columns, rows) } else { (rows, columns) };
                let values = weight.into_data().try_to_vec::<f32>().ok()?;
                let bias = bias.and_then(|b| b.into_data().try_to_vec::<f32>().ok());
                let packed = crate::fused::pack_linear(&values, depth, features, bias.as_deref(), transposed);
                Some((Tensor::from_data(packed, &device), features))
            })
            .clone()
    }

    /// The bf16 weight of parameter `id` ([K, N], or [N, K] when `transposed`) packed for the
    /// native bf16 product on first use; `None` for weights it does not serve (not bf16 on the
    /// plain CPU backend of a CPU with AVX-512 BF16).
    fn get_bf16(
        &self,
        id: ParamId,
        weight: impl FnOnce() -> Tensor<2>,
        transposed: bool,
    ) -> Option<Arc<crate::bf16_gemm::PackedB>> {
        if !crate::bf16_gemm::supported() {
            return None;
        }
        let mut weights = self.bf16.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        weights
            .entry(id)
            .or_insert_with(|| {
                let weight = weight();
                if !crate::fused::native_bf16(&weight) || weight.device().is_autodiff() {
                    return None;
                }
                let [rows, cols] = weight.dims();
                let data = weight.into_data();
                let view = crate::bf16_gemm::MatRef {
                    elems: crate::bf16_gemm::Elems::Bf16(data.as_slice::<half::bf16>().ok()?),
                    offset: 0,
                    rows,
                    cols,
                    row_stride: cols as isize,
                    col_stride: 1,
                };
                Some(Arc::new(crate::bf16_gemm::PackedB::new(if transposed { view.t() } else { view })))
            })
            .clone()
    }

    /// `x` [.., K] (bf16) times a packed bf16 weight plus `bias`, in f32 when `f32_out` (logits,
    /// as the training pass's fused head keeps them), else rounded to bf16; `x` back when it is
    /// not a bf16 tensor on the plain CPU backend.
    fn apply_bf16<const D: usize>(
        x: Tensor<D>,
        packed: &crate::bf16_gemm::PackedB,
        bias: Option<Tensor<1>>,
        f32_out: bool,
    ) -> Result<Tensor<D>, Tensor<D>> {
        if !crate::fused::native_bf16(&x) || x.device().is_autodiff() {
            return Err(x);
        }
        let [depth, features] = packed.dims();
        let (mut dims, device) = (x.dims(), x.device());
        let rows = dims[..D - 1].iter().product();
        let data = x.into_data();
        let input = crate::bf16_gemm::MatRef {
            elems: crate::bf16_gemm::Elems::Bf16(data.as_slice::<half::bf16>().expect("bf16 values")),
            offset: 0,
            rows,
            cols: depth,
            row_stride: depth as isize,
            col_stride: 1,
        };
        let mut out = vec![0.0f32; rows * features];
        crate::bf16_gemm::matmul_packed(input, packed, &mut out);
        dims[D - 1] = features;
        let y = if f32_out {
            Tensor::<D>::from_data(TensorData::new(out, dims), &device)
        } else {
            Tensor::<D>::from_data(TensorData::new(crate::bf16_gemm::to_bf16(&out), dims), &device)
                .cast(burn::tensor::FloatDType::BF16)
        };
        let dtype = y.dtype();
        Ok(match bias {
            Some(bias) => y + bias.cast(dtype).unsqueeze(),
            None => y,
        })
    }

    /// `x` [.., K] times the packed weight, narrowed to its `features` outputs.
    fn apply<const D: usize>(x: Tensor<D>, (packed, features): &(Tensor<3>, usize)) -> Result<Tensor<D>, Tensor<D>> {
        let y = crate::fused::fused_packed_linear(x, packed)?;
        let padded = y.dims()[D - 1];
        Ok(if padded == *features { y } else { y.narrow(D - 1, 0, *features) })
    }
}

/// A LoRA-adapted `linear` applied to `x` [.., in] with the adapter kept apart:
/// `x W + s (x A) B + bias` (PEFT's unmerged forward). burn's `Linear::forward` materialises
/// `W + s A B` [in, out] on every call, and its backward pass then computes the whole [in, out]
/// weight gradient only to reduce it to A's and B's: as many FLOPs as full fine-tuning. Here the
/// frozen `W` (a parameter without `require_grad`) gets no gradient, and the adapter costs two
/// thin products of rank `r` forward and four backward.
fn lora_linear<const D: usize>(linear: &Linear, adapter: &burn::module::LoraAdapter, x: Tensor<D>) -> Tensor<D> {
    use crate::fused::linear as affine;
    let low = affine(x.clone(), adapter.a.val(), None); // [.., r]
    let delta = affine(low, adapter.b.val(), None).mul_scalar(adapter.scale); // [.., out]
    affine(x, linear.weight.base(), linear.bias.as_ref().map(|bias| bias.val())) + delta
}

impl KvCache {
    /// Sends this cache's linear layers through `packed` (shared by the caches of one
    /// generation's threads).
    pub fn with_packed_weights(mut self, packed: Arc<PackedWeights>) -> Self {
        self.packed = Some(packed);
        self
    }

    /// The packed weights of `id` when this cache has packed weights.
    fn packed_for(
        &self,
        id: ParamId,
        weight: impl FnOnce() -> (Tensor<2>, Option<Tensor<1>>),
        transposed: bool,
    ) -> Option<(Tensor<3>, usize)> {
        self.packed.as_ref()?.get(id, weight, transposed)
    }

    /// `linear.forward(x)`, through the packed weight when this cache has them (same values: one FMA
    /// chain per output, then the bias).
    pub fn linear<const D: usize>(&self, linear: &Linear, x: Tensor<D>) -> Tensor<D> {
        self.linear_to(linear, x, false)
    }

    /// An untied LM head: [`KvCache::linear`], but with f32 logits where bf16 weights are packed.
    pub fn head<const D: usize>(&self, linear: &Linear, x: Tensor<D>) -> Tensor<D> {
        self.linear_to(linear, x, true)
    }

    /// [`KvCache::linear`], in f32 when `f32_out` and bf16 weights are packed.
    fn linear_to<const D: usize>(&self, linear: &Linear, x: Tensor<D>, f32_out: bool) -> Tensor<D> {
        let bias = || linear.bias.as_ref().map(|bias| bias.val());
        let packed = (x.dtype() == DType::BF16)
            .then(|| self.packed.as_ref()?.get_bf16(linear.weight.id, || linear.weight.val(), false))
            .flatten();
        let x = match packed {
            Some(packed) => match PackedWeights::apply_bf16(x, &packed, bias(), f32_out) {
                Ok(y) => return y,
                Err(x) => x,
            },
            None => x,
        };
        let weight = || (linear.weight.val(), bias());
        match self.packed_for(linear.weight.id, weight, false) {
            Some(packed) => PackedWeights::apply(x, &packed).unwrap_or_else(|x| linear.forward(x)),
            None => match linear.weight.adapter() {
                Some(adapter) => lora_linear(linear, adapter, x),
                None => crate::fused::linear(x, linear.weight.val(), bias()),
            },
        }
    }

    /// `hidden` [B, T, C] times the transpose of the tied embedding table [V, C] (parameter
    /// `id`): logits [B, T, V], through the packed table when this cache has packed weights.
    pub fn tied_head(&self, hidden: Tensor<3>, id: ParamId, table: impl Fn() -> Tensor<2>) -> Tensor<3> {
        let packed =
            (hidden.dtype() == DType::BF16).then(|| self.packed.as_ref()?.get_bf16(id, &table, true)).flatten();
        let hidden = match packed {
            Some(packed) => match PackedWeights::apply_bf16(hidden, &packed, None, true) {
                Ok(logits) => return logits,
                Err(hidden) => hidden,
            },
            None => hidden,
        };
        let unpacked = |hidden: Tensor<3>| {
            let [batch, length, width] = hidden.dims();
            let head = table().transpose(); // [C, V]
            let vocab = head.dims()[1];
            crate::fused::matmul(hidden.reshape([batch * length, width]), head).reshape([batch, length, vocab])
        };
        match self.packed_for(id, || (table(), None), true) {
            Some(packed) => PackedWeights::apply(hidden, &packed).unwrap_or_else(unpacked),
            None => unpacked(hidden),
        }
    }

    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], packed: None }
    }

    /// Number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        self.layers.first().and_then(Option::as_ref).map_or(0, |layer| layer.len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values [B, K, T, D] to layer `index` and returns all of
    /// them [B, K, S, D].
    pub fn append(&mut self, index: usize, key: Tensor<4>, value: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let entry = &mut self.layers[index];
        let Some(cached) = entry.take() else {
            let len = key.dims()[2];
            *entry = Some(LayerCache { key: key.clone(), value: value.clone(), len });
            return (key, value);
        };
        let [batch, heads, steps, dim] = key.dims();
        let (start, end) = (cached.len, cached.len + steps);
        let grow = |buffer: Tensor<4>| {
            let capacity = buffer.dims()[2];
            if end <= capacity {
                return buffer;
            }
            let room = end.max(2 * capacity) - start;
            let spare = Tensor::<4>::zeros([batch, heads, room, dim], &buffer.device()).cast(buffer.dtype());
            Tensor::cat(vec![buffer.slice([0..batch, 0..heads, 0..start, 0..dim]), spare], 2)
        };
        // In place: the cache holds the only reference to its buffers between steps.
        let write = |buffer: Tensor<4>, rows: Tensor<4>| {
            grow(buffer).slice_assign([0..batch, 0..heads, start..end, 0..dim], rows)
        };
        let (key_buffer, value_buffer) = (write(cached.key, key), write(cached.value, value));
        let view = |buffer: &Tensor<4>| buffer.clone().slice([0..batch, 0..heads, 0..end, 0..dim]);
        let (key, value) = (view(&key_buffer), view(&value_buffer));
        *entry = Some(LayerCache { key: key_buffer, value: value_buffer, len: end });
        (key, value)
    }

    /// Keeps only the rows in `keep` (sequences still being generated), in that order.
    pub fn select_rows(&mut self, keep: Tensor<1, Int>) {
        for layer in self.layers.iter_mut().flatten() {
            layer.key = layer.key.clone().select(0, keep.clone());
            layer.value = layer.value.clone().select(0, keep.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_fast_path_matches_the_merged_weight_and_leaves_the_base_without_gradient() {
        use burn::module::{Lora, Module, ModuleMapper, Param};
        let device = Device::flex().autodiff();
        let values = |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect() };
        let mut linear = burn::nn::LinearConfig::new(6, 5).init(&device);
        linear.bias = Some(burn::module::Param::from_tensor(Tensor::from_floats(values(5, 0.3).as_slice(), &device)));
        let linear = linear.apply_lora(Lora::new(3, 6.0));
        // B starts at zero in LoRA; give it values so that the adapter contributes.
        struct FillB(burn::module::ParamId, Vec<f32>);
        impl ModuleMapper for FillB {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                if param.id != self.0 {
                    return param;
                }
                let values = self.1.clone();
                param.map(|tensor| {
                    Tensor::from_data(TensorData::new(values, tensor.shape()), &tensor.device()).require_grad()
                })
            }
        }
        let b_id = linear.weight.adapter().unwrap().b.id;
        let linear = linear.map(&mut FillB(b_id, values(15, 1.1)));
        let adapter = linear.weight.adapter().unwrap().clone();
        let x = Tensor::<3>::from_data(TensorData::new(values(2 * 4 * 6, 2.0), [2, 4, 6]), &device);
        let weights = Tensor::<3>::from_data(TensorData::new(values(2 * 4 * 5, 3.0), [2, 4, 5]), &device);
        let grads = |y: Tensor<3>| {
            let out = y.clone().into_data().try_to_vec::<f32>().unwrap();
            let grads = (y * weights.clone()).sum().backward();
            let grad = |t: Tensor<2>| t.grad(&grads).map(|g| g.into_data().try_to_vec::<f32>().unwrap());
            (out, grad(adapter.a.val()), grad(adapter.b.val()), grad(linear.weight.base()))
        };
        let (fast, fast_a, fast_b, fast_w) = grads(lora_linear(&linear, &adapter, x.clone()));
        let (merged, merged_a, merged_b, _) = grads(linear.forward(x));
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-5 * (1.0 + b.abs()));
        assert!(close(&fast, &merged), "outputs: {fast:?} vs {merged:?}");
        assert!(close(&fast_a.unwrap(), &merged_a.unwrap()), "A's gradient");
        assert!(close(&fast_b.unwrap(), &merged_b.unwrap()), "B's gradient");
        assert!(fast_w.is_none(), "the frozen base weight gets no gradient");
    }

    #[test]
    fn gelu_new_is_the_tanh_formula() {
        let device = Device::flex();
        let xs: Vec<f32> = (0..=400).map(|i| -10.0 + i as f32 * 0.05).collect();
        let got = gelu_new(Tensor::<1>::from_floats(xs.as_slice(), &device)).into_data().try_to_vec::<f32>().unwrap();
        for (x, got) in xs.iter().zip(got) {
            let x = f64::from(*x);
            let expected = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!(
                (f64::from(got) - expected).abs() < 1e-6 * (1.0 + expected.abs()),
                "gelu_new({x}) = {got}, expected {expected}"
            );
        }
    }

    #[test]
    fn the_cache_returns_every_appended_position_across_growth_and_row_selection() {
        let device = Device::flex();
        let step = |t: usize, from: usize| {
            let values: Vec<f32> = (0..2 * 3 * t * 4).map(|i| (from * 1000 + i) as f32).collect();
            Tensor::<4>::from_data(TensorData::new(values, [2, 3, t, 4]), &device)
        };
        let mut cache = KvCache::new(1);
        let mut expected = step(3, 0);
        cache.append(0, expected.clone(), expected.clone() * 2.0);
        for i in 1..12 {
            let new = step(1 + i % 2, i);
            expected = Tensor::cat(vec![expected, new.clone()], 2);
            let (key, value) = cache.append(0, new.clone(), new * 2.0);
            assert_eq!(key.clone().into_data(), expected.clone().into_data(), "step {i}");
            assert_eq!(value.into_data(), (expected.clone() * 2.0).into_data(), "step {i}");
            assert_eq!(cache.len(), expected.dims()[2]);
        }
        cache.select_rows(Tensor::from_data(TensorData::new(vec![1i64], [1]), &device));
        let (key, _) =
            cache.append(0, step(1, 99).slice([1..2, 0..3, 0..1, 0..4]), step(1, 99).slice([1..2, 0..3, 0..1, 0..4]));
        let length = expected.dims()[2];
        let kept = Tensor::cat(
            vec![expected.slice([1..2, 0..3, 0..length, 0..4]), step(1, 99).slice([1..2, 0..3, 0..1, 0..4])],
            2,
        );
        assert_eq!(key.into_data(), kept.into_data());
    }

    #[test]
    fn masks_block_padding_the_future_and_outside_the_window() {
        let device = Device::flex();
        // One row: two pads then three tokens.
        let input = StepInput::from_padded(&[vec![0, 0, 5, 6, 7]], &[vec![false, false, true, true, true]]);
        assert_eq!(input.position_ids, vec![1, 1, 0, 1, 2]);
        let blocked = input.blocked_mask(Some(2), &device).into_data().try_to_vec::<bool>().unwrap();
        // Query 4 (third real token) sees keys 3 and 4 only (window 2).
        assert_eq!(&blocked[4 * 5..5 * 5], &[true, true, true, false, false]);
        let global = input.blocked_mask(None, &device).into_data().try_to_vec::<bool>().unwrap();
        assert_eq!(&global[4 * 5..5 * 5], &[true, true, false, false, false]);
        // A padding query sees only itself; every row keeps at least one visible key.
        assert_eq!(&global[5..2 * 5], &[true, false, true, true, true]);
        assert!(global.chunks(5).all(|row| row.contains(&false)));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let scaling = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = Rope::new(64, 500000.0);
        let scaled = Rope::llama3(64, 500000.0, scaling);
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-12);
    }
}
