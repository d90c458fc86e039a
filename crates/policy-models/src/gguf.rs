//! GGUF checkpoints (llama.cpp's single-file format): the container, dequantization to f32, the
//! map from llama.cpp's tensor names to Hugging Face keys, and the model config, tokenizer and
//! chat template from the metadata. The result is what transformers'
//! `from_pretrained(dir, gguf_file=...)` builds: a plain f32 checkpoint.
//!
//! The container is read here rather than through a crate: the maintained GGUF crates panic
//! (`todo!`, unchecked slicing) on tensor types they do not know and on truncated files, where a
//! loader must name the file and the offset.
//!
//! Layout (GGUF v2/v3, little-endian): `"GGUF"`, version u32, tensor count u64, metadata count
//! u64; metadata `key: string, type: u32, value`; tensor infos `name, n_dims u32, ne[n_dims]
//! u64, type u32, offset u64`; padding to `general.alignment` (default 32); tensor data.
//! `ne[0]` is the fastest-varying dimension, so the PyTorch shape is `ne` reversed.
//!
//! Block formats (ggml-common.h), each `QK` values from a few scales and packed integers:
//!
//! | type | values / block | bytes | value |
//! |---|---|---|---|
//! | Q4_0 | 32 | 18 | `d * (q - 8)`, q in 0..16 |
//! | Q4_1 | 32 | 20 | `d * q + m` |
//! | Q5_0 | 32 | 22 | `d * (q - 16)`, q in 0..32 (fifth bit from `qh`) |
//! | Q5_1 | 32 | 24 | `d * q + m` |
//! | Q8_0 | 32 | 34 | `d * q`, q an i8 |
//! | Q4_K | 256 | 144 | `d * sc_j * q - dmin * m_j`, eight sub-blocks of 32 with 6-bit scales and mins |
//! | Q5_K | 256 | 176 | as Q4_K with a fifth bit from `qh` |
//! | Q6_K | 256 | 210 | `d * sc_j * (q - 32)`, sixteen sub-blocks of 16 with i8 scales |

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::weights::LoadError;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// An array of one type.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::Uint(value) => Some(value),
            MetaValue::Int(value) => u64::try_from(value).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::Float(value) => Some(value),
            MetaValue::Uint(value) => Some(value as f64),
            MetaValue::Int(value) => Some(value as f64),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(text) => Some(text),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(value) => Some(value),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// ggml's tensor types that cotlab dequantizes (the numbers are ggml's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    Bf16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// ggml's name for a type id, for error messages.
    fn name_of(id: u32) -> String {
        const NAMES: [&str; 31] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
            "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
        ];
        NAMES.get(id as usize).map_or_else(|| format!("type {id}"), |name| name.to_string())
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }
}

/// One tensor's entry in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// `ne` reversed: the PyTorch shape.
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlType,
    /// Start of the data, from the beginning of the file.
    start: usize,
    /// Length of the data in bytes.
    len: usize,
}

impl TensorInfo {
    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened GGUF file: metadata and tensor directory, data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Metadata by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensors by llama.cpp name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// A cursor over the header with errors that say where the file broke.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, message: impl std::fmt::Display) -> LoadError {
        LoadError::Gguf { path: self.path.to_path_buf(), message: format!("at byte {}: {message}", self.at) }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.error(format!(
                "needs {n} more bytes but the file ends at {}; the file is truncated",
                self.bytes.len()
            )));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A length or count, bounded by what the rest of the file could hold.
    fn count(&mut self, what: &str) -> Result<usize, LoadError> {
        let value = self.u64()?;
        if value > (self.bytes.len() - self.at) as u64 {
            return Err(self.error(format!("{what} {value} is larger than the rest of the file; the file is corrupt")));
        }
        Ok(value as usize)
    }

    fn string(&mut self) -> Result<String, LoadError> {
        let len = self.count("string length")?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error("a string is not valid UTF-8"))
    }

    fn value(&mut self, kind: u32) -> Result<MetaValue, LoadError> {
        Ok(match kind {
            0 => MetaValue::Uint(u64::from(self.take(1)?[0])),
            1 => MetaValue::Int(i64::from(self.take(1)?[0] as i8)),
            2 => MetaValue::Uint(u64::from(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))),
            3 => MetaValue::Int(i64::from(i16::from_le_bytes(self.take(2)?.try_into().expect("2")))),
            4 => MetaValue::Uint(u64::from(self.u32()?)),
            5 => MetaValue::Int(i64::from(self.u32()? as i32)),
            6 => MetaValue::Float(f64::from(f32::from_bits(self.u32()?))),
            7 => MetaValue::Bool(self.take(1)?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let item_kind = self.u32()?;
                if item_kind == 9 {
                    // As llama.cpp: no nested arrays (and no unbounded recursion on a crafted file).
                    return Err(
                        self.error("an array of arrays in the metadata; GGUF metadata arrays hold scalars or strings")
                    );
                }
                let len = self.count("array length")?;
                let mut items = Vec::with_capacity(len.min(1 << 20));
                for _ in 0..len {
                    items.push(self.value(item_kind)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::Uint(self.u64()?),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_bits(self.u64()?)),
            other => return Err(self.error(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and indexes `path`; tensor data is read (and dequantized) on demand.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let io = |source| LoadError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only mapping of a file nobody is expected to modify while it is loaded (as
        // for safetensors in weights.rs).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut reader = Reader { bytes: &mmap, at: 0, path };
        if reader.take(4)? != b"GGUF" {
            return Err(LoadError::Gguf {
                path: path.to_path_buf(),
                message: "does not start with the GGUF magic bytes; not a GGUF file (or a download that stored an error page)".to_string(),
            });
        }
        let version = reader.u32()?;
        if !(2..=3).contains(&version) {
            return Err(reader.error(format!(
                "GGUF version {version} is not supported (2 and 3 are; a big-endian file reads as a huge version): re-convert it with a current llama.cpp"
            )));
        }
        let tensor_count = reader.count("tensor count")?;
        let metadata_count = reader.count("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = reader.string()?;
            let kind = reader.u32()?;
            let value = reader.value(kind)?;
            metadata.insert(key, value);
        }
        // A count only bounded by the file's size: reserve no more than a real model needs.
        let mut infos = Vec::with_capacity(tensor_count.min(1 << 16));
        for _ in 0..tensor_count {
            let name = reader.string()?;
            let dims = reader.u32()? as usize;
            if !(1..=4).contains(&dims) {
                return Err(reader.error(format!("tensor `{name}` has {dims} dimensions; ggml tensors have 1 to 4")));
            }
            let mut shape = (0..dims).map(|_| reader.u64().map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
            shape.reverse();
            let type_id = reader.u32()?;
            let offset = reader.u64()? as usize;
            let Some(dtype) = GgmlType::from_id(type_id) else {
                return Err(reader.error(format!(
                    "tensor `{name}` is stored as {}; cotlab reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K: \
                     re-quantize the model to one of these (llama.cpp's llama-quantize)",
                    GgmlType::name_of(type_id)
                )));
            };
            infos.push((name, shape, dtype, offset));
        }
        let alignment = metadata.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(32) as usize;
        if !alignment.is_power_of_two() {
            return Err(reader.error(format!("general.alignment is {alignment}; GGUF requires a power of two")));
        }
        let data_start = reader.at.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, shape, dtype, offset) in infos {
            let bad = |message: String| LoadError::Gguf {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {message}"),
            };
            let numel = shape
                .iter()
                .try_fold(1usize, |product, &dim| product.checked_mul(dim))
                .ok_or_else(|| bad(format!("shape {shape:?} overflows; the file is corrupt")))?;
            let (block_values, block_bytes) = dtype.block();
            if numel % block_values != 0 {
                return Err(bad(format!("{numel} values, not a multiple of its type's block of {block_values}")));
            }
            let len = (numel / block_values).checked_mul(block_bytes);
            let start = data_start.checked_add(offset);
            let end = start.zip(len).and_then(|(start, len)| start.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= mmap.len() => {
                    tensors.insert(name, TensorInfo { shape, dtype, start, len: end - start });
                }
                _ => {
                    return Err(bad(format!(
                        "its data (offset {offset}, {numel} values of {dtype:?}) ends past the file's {} bytes; the file is truncated: download it again",
                        mmap.len()
                    )));
                }
            }
        }
        Ok(Self { path: path.to_path_buf(), mmap, metadata, tensors })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, or an error naming the key.
    pub fn meta(&self, key: &str) -> Result<&MetaValue, LoadError> {
        self.metadata.get(key).ok_or_else(|| LoadError::Gguf {
            path: self.path.clone(),
            message: format!("metadata key `{key}` is missing"),
        })
    }

    /// The tensor `name` dequantized to f32, in row-major order of [`TensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        self.hf_values(name, None)
    }

    /// As [`GgufFile::dequantize`], with llama.cpp's rotary row permutation undone for a
    /// projection of `unpermute_heads` heads (see [`GgufFile::hf_keys`]).
    pub fn hf_values(&self, name: &str, unpermute_heads: Option<usize>) -> Result<Vec<f32>, LoadError> {
        let info = self.tensors.get(name).ok_or_else(|| LoadError::Gguf {
            path: self.path.clone(),
            message: format!("tensor `{name}` is missing"),
        })?;
        let values = dequantize(info.dtype, &self.mmap[info.start..info.start + info.len]);
        let Some(heads) = unpermute_heads else { return Ok(values) };
        let rows = info.shape[0];
        if heads == 0 || rows % (2 * heads) != 0 {
            return Err(self.gguf_error(format!(
                "tensor `{name}`: {rows} rows do not split into {heads} rotary heads of even size"
            )));
        }
        Ok(unpermute_rotary_rows(&values, rows, heads))
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes whole blocks of `dtype` (the caller checked the length is a multiple of a block).
pub fn dequantize(dtype: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let (block_values, block_bytes) = dtype.block();
    let mut out = vec![0.0f32; bytes.len() / block_bytes * block_values];
    let blocks = bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(block_values));
    match dtype {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::Bf16 => blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                y[j] = f32::from(i16::from(q & 0xF) - 8) * d;
                y[j + 16] = f32::from(i16::from(q >> 4) - 8) * d;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                y[j] = f32::from(q & 0xF) * d + m;
                y[j + 16] = f32::from(q >> 4) * d + m;
            }
        }),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for (j, &q) in b[6..22].iter().enumerate() {
                let high0 = ((qh >> j) << 4) & 0x10;
                let high1 = (qh >> (j + 12)) & 0x10;
                y[j] = ((u32::from(q & 0xF) | high0) as i32 - 16) as f32 * d;
                y[j + 16] = ((u32::from(q >> 4) | high1) as i32 - 16) as f32 * d;
            }
        }),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for (j, &q) in b[8..24].iter().enumerate() {
                let high0 = ((qh >> j) << 4) & 0x10;
                let high1 = (qh >> (j + 12)) & 0x10;
                y[j] = (u32::from(q & 0xF) | high0) as f32 * d + m;
                y[j + 16] = (u32::from(q >> 4) | high1) as f32 * d + m;
            }
        }),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (value, &q) in y.iter_mut().zip(&b[2..34]) {
                *value = f32::from(q as i8) * d;
            }
        }),
        GgmlType::Q4K => blocks.for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for chunk in 0..4 {
                let (sc0, m0) = scale_min_k4(2 * chunk, scales);
                let (sc1, m1) = scale_min_k4(2 * chunk + 1, scales);
                let (d0, min0, d1, min1) =
                    (d * f32::from(sc0), dmin * f32::from(m0), d * f32::from(sc1), dmin * f32::from(m1));
                let q = &qs[32 * chunk..32 * chunk + 32];
                let y = &mut y[64 * chunk..64 * chunk + 64];
                for l in 0..32 {
                    y[l] = d0 * f32::from(q[l] & 0xF) - min0;
                    y[l + 32] = d1 * f32::from(q[l] >> 4) - min1;
                }
            }
        }),
        GgmlType::Q5K => blocks.for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for chunk in 0..4 {
                let (sc0, m0) = scale_min_k4(2 * chunk, scales);
                let (sc1, m1) = scale_min_k4(2 * chunk + 1, scales);
                let (d0, min0, d1, min1) =
                    (d * f32::from(sc0), dmin * f32::from(m0), d * f32::from(sc1), dmin * f32::from(m1));
                let (bit0, bit1) = (1u8 << (2 * chunk), 1u8 << (2 * chunk + 1));
                let q = &qs[32 * chunk..32 * chunk + 32];
                let y = &mut y[64 * chunk..64 * chunk + 64];
                for l in 0..32 {
                    let high0 = if qh[l] & bit0 != 0 { 16 } else { 0 };
                    let high1 = if qh[l] & bit1 != 0 { 16 } else { 0 };
                    y[l] = d0 * f32::from((q[l] & 0xF) + high0) - min0;
                    y[l + 32] = d1 * f32::from((q[l] >> 4) + high1) - min1;
                }
            }
        }),
        GgmlType::Q6K => blocks.for_each(|(b, y)| {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for half in 0..2 {
                let ql = &ql[64 * half..64 * half + 64];
                let qh = &qh[32 * half..32 * half + 32];
                let sc = &scales[8 * half..8 * half + 8];
                let y = &mut y[128 * half..128 * half + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
                    let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    let scale = |k: usize| d * f32::from(sc[is + k] as i8);
                    y[l] = scale(0) * q1 as f32;
                    y[l + 32] = scale(2) * q2 as f32;
                    y[l + 64] = scale(4) * q3 as f32;
                    y[l + 96] = scale(6) * q4 as f32;
                }
            }
        }),
    }
    out
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Undoes llama.cpp's rotary permutation of a query or key projection's rows (`rows` rows,
/// `heads` heads). The converter stores each head's rows interleaved (`permute` in
/// convert_hf_to_gguf.py: `reshape(heads, 2, D/2, ...).swapaxes(1, 2)`) for ggml's rotary
/// kernel; Hugging Face's rotate-half layout wants the two halves back in place, as
/// transformers' `reverse_permute_weights` does.
pub fn unpermute_rotary_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let half = rows / heads / 2;
    let mut out = vec![0.0f32; values.len()];
    for head in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = head * 2 * half + 2 * i + j;
                let to = head * 2 * half + j * half + i;
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// The GGUF architectures cotlab maps to its own (`general.architecture`).
const ARCHITECTURES: &str = "llama (Llama, SmolLM) and qwen2 (Qwen2, Qwen2.5)";

impl GgufFile {
    fn gguf_error(&self, message: impl Into<String>) -> LoadError {
        LoadError::Gguf { path: self.path.clone(), message: message.into() }
    }

    /// `general.architecture`, checked against the ones cotlab maps.
    pub fn architecture(&self) -> Result<&str, LoadError> {
        let arch = self.meta("general.architecture")?.as_str().unwrap_or_default();
        match arch {
            "llama" | "qwen2" => Ok(arch),
            other => {
                Err(self.gguf_error(format!("architecture `{other}` is not supported; cotlab reads {ARCHITECTURES}")))
            }
        }
    }

    fn arch_usize(&self, field: &str) -> Result<usize, LoadError> {
        let key = format!("{}.{field}", self.architecture()?);
        self.meta(&key)?
            .as_u64()
            .map(|value| value as usize)
            .ok_or_else(|| self.gguf_error(format!("`{key}` is not an integer")))
    }

    /// `attention.head_count_kv`, defaulting to `heads` only when absent (a per-layer array,
    /// which some converters write, is an error rather than a silent full-head model).
    fn kv_heads(&self, heads: usize) -> Result<usize, LoadError> {
        let key = format!("{}.attention.head_count_kv", self.architecture()?);
        if self.metadata.contains_key(&key) { self.arch_usize("attention.head_count_kv") } else { Ok(heads) }
    }

    fn arch_f64(&self, field: &str) -> Result<Option<f64>, LoadError> {
        let key = format!("{}.{field}", self.architecture()?);
        match self.metadata.get(&key) {
            None => Ok(None),
            Some(value) => value.as_f64().map(Some).ok_or_else(|| self.gguf_error(format!("`{key}` is not a number"))),
        }
    }

    fn token_id(&self, field: &str) -> Option<u32> {
        self.metadata.get(&format!("tokenizer.ggml.{field}")).and_then(MetaValue::as_u64).map(|id| id as u32)
    }

    /// The `config.json` transformers writes for this file's model (`from_pretrained(...,
    /// gguf_file=...)` then `save_pretrained`).
    pub fn hf_config(&self) -> Result<serde_json::Value, LoadError> {
        let arch = self.architecture()?;
        if self.tensors.contains_key("rope_freqs.weight") {
            return Err(self.gguf_error(
                "has `rope_freqs.weight` (Llama 3.1+ rotary scaling factors), which cotlab does not map yet; use the model's Hugging Face directory",
            ));
        }
        let heads = self.arch_usize("attention.head_count")?;
        let hidden = self.arch_usize("embedding_length")?;
        let vocab = match self.metadata.get(&format!("{arch}.vocab_size")).and_then(MetaValue::as_u64) {
            Some(size) => size as usize,
            None => self.meta("tokenizer.ggml.tokens")?.as_array().map_or(0, <[MetaValue]>::len),
        };
        let head_dim = match self.metadata.get(&format!("{arch}.attention.key_length")).and_then(MetaValue::as_u64) {
            Some(dim) => dim as usize,
            None => hidden / heads.max(1),
        };
        let mut config = serde_json::json!({
            "model_type": arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.arch_usize("feed_forward_length")?,
            "num_hidden_layers": self.arch_usize("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.kv_heads(heads)?,
            "max_position_embeddings": self.arch_usize("context_length")?,
            "rms_norm_eps": self.arch_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            "rope_theta": self.arch_f64("rope.freq_base")?.unwrap_or(10000.0),
            "tie_word_embeddings": !self.tensors.contains_key("output.weight"),
            "bos_token_id": self.token_id("bos_token_id"),
            "eos_token_id": self.token_id("eos_token_id"),
            "pad_token_id": self.token_id("padding_token_id"),
        });
        if arch == "llama" {
            config["head_dim"] = serde_json::json!(head_dim);
            config["attention_bias"] = serde_json::json!(self.tensors.contains_key("blk.0.attn_q.bias"));
            config["mlp_bias"] = serde_json::json!(self.tensors.contains_key("blk.0.ffn_up.bias"));
        }
        Ok(config)
    }

    /// Each Hugging Face key of the decoder and the GGUF tensor it comes from, with the head count
    /// whose rotary permutation to undo (llama.cpp permutes Llama's query and key rows, not
    /// Qwen2's).
    pub fn hf_keys(&self) -> Result<BTreeMap<String, (String, Option<usize>)>, LoadError> {
        let llama = self.architecture()? == "llama";
        let heads = self.arch_usize("attention.head_count")?;
        let kv_heads = self.kv_heads(heads)?;
        let mut keys = BTreeMap::new();
        let mut add = |hf: String, gguf: String, unpermute: Option<usize>| {
            keys.insert(hf, (gguf, unpermute));
        };
        add("model.embed_tokens.weight".into(), "token_embd.weight".into(), None);
        add("model.norm.weight".into(), "output_norm.weight".into(), None);
        add("lm_head.weight".into(), "output.weight".into(), None);
        for layer in 0..self.arch_usize("block_count")? {
            let (hf, gguf) = (format!("model.layers.{layer}"), format!("blk.{layer}"));
            add(format!("{hf}.input_layernorm.weight"), format!("{gguf}.attn_norm.weight"), None);
            add(format!("{hf}.post_attention_layernorm.weight"), format!("{gguf}.ffn_norm.weight"), None);
            for suffix in ["weight", "bias"] {
                let rotary = |count: usize| llama.then_some(count);
                add(format!("{hf}.self_attn.q_proj.{suffix}"), format!("{gguf}.attn_q.{suffix}"), rotary(heads));
                add(format!("{hf}.self_attn.k_proj.{suffix}"), format!("{gguf}.attn_k.{suffix}"), rotary(kv_heads));
                add(format!("{hf}.self_attn.v_proj.{suffix}"), format!("{gguf}.attn_v.{suffix}"), None);
                add(format!("{hf}.self_attn.o_proj.{suffix}"), format!("{gguf}.attn_output.{suffix}"), None);
                add(format!("{hf}.mlp.gate_proj.{suffix}"), format!("{gguf}.ffn_gate.{suffix}"), None);
                add(format!("{hf}.mlp.up_proj.{suffix}"), format!("{gguf}.ffn_up.{suffix}"), None);
                add(format!("{hf}.mlp.down_proj.{suffix}"), format!("{gguf}.ffn_down.{suffix}"), None);
            }
        }
        Ok(keys)
    }

    /// The chat template (`tokenizer.chat_template`), if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.metadata.get("tokenizer.chat_template").and_then(MetaValue::as_str)
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` document, built from `tokenizer.ggml.*`
    /// the way llama.cpp tokenizes: byte-level BPE over the vocabulary and merges, with the
    /// pre-tokenizer that `tokenizer.ggml.pre` names, control tokens as special added tokens, and
    /// a BOS template when `tokenizer.ggml.add_bos_token` is set.
    pub fn tokenizer_json(&self) -> Result<serde_json::Value, LoadError> {
        use serde_json::json;
        let model = self.meta("tokenizer.ggml.model")?.as_str().unwrap_or_default();
        if model != "gpt2" {
            return Err(self.gguf_error(format!(
                "tokenizer.ggml.model is `{model}`; cotlab builds byte-level BPE tokenizers (`gpt2`) from GGUF metadata: \
                 use the model's tokenizer.json instead"
            )));
        }
        let strings = |key: &str| -> Result<Vec<&str>, LoadError> {
            let items =
                self.meta(key)?.as_array().ok_or_else(|| self.gguf_error(format!("`{key}` is not an array")))?;
            items
                .iter()
                .map(|item| item.as_str().ok_or_else(|| self.gguf_error(format!("`{key}` holds a non-string"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match self.metadata.get("tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
            Some(items) => items.iter().map(|item| item.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(id, token)| (token.to_string(), json!(id))).collect();
        // llama.cpp's token types: 3 control (special added tokens), 4 user-defined (added).
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, kind))| matches!(kind, 3 | 4))
            .map(|(id, (token, kind))| {
                json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": *kind == 4, "special": *kind == 3})
            })
            .collect();
        let pre = self.metadata.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
        // llama.cpp's `default` (and a missing name) is its own expression list, not GPT-2's.
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let (normalizer, pre_tokenizer) = match pre {
            "gpt2" => (json!(null), byte_level(true)),
            // llama.cpp: `\p{N}` then GPT-2's expression; the hub tokenizer.json: individual
            // digits, then byte-level with GPT-2's expression.
            "smollm" => (
                json!(null),
                json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            ),
            "llama-bpe" | "llama3" => (
                json!(null),
                json!({"type": "Sequence", "pretokenizers": [split(crate::tokenizer::LLAMA3_PATTERN), byte_level(false)]}),
            ),
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(crate::tokenizer::QWEN2_PATTERN), byte_level(false)]}),
            ),
            other => {
                return Err(self.gguf_error(format!(
                    "tokenizer.ggml.pre `{other}` is not supported (cotlab knows gpt2, smollm, llama-bpe, qwen2): \
                     use the model's tokenizer.json instead"
                )));
            }
        };
        let add_bos = self.metadata.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(false);
        let post_processor = match self.token_id("bos_token_id").filter(|_| add_bos) {
            Some(bos) => {
                let text = *tokens
                    .get(bos as usize)
                    .ok_or_else(|| self.gguf_error(format!("bos_token_id {bos} is outside the vocabulary")))?;
                let template = json!({"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {text: {"id": text, "ids": [bos], "tokens": [text]}}});
                // As tokenizer.rs builds Llama 3's: byte-level offsets, then the BOS.
                json!({"type": "Sequence", "processors": [byte_level(true), template]})
            }
            None => byte_level(true),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": matches!(pre, "llama-bpe" | "llama3"), "vocab": vocab, "merges": merges},
        }))
    }

    /// `tokenizer_config.json` for the tokenizer above: the special tokens by name, whether a BOS
    /// is added, and the chat template.
    pub fn tokenizer_config_json(&self) -> serde_json::Value {
        let tokens = self.metadata.get("tokenizer.ggml.tokens").and_then(MetaValue::as_array).unwrap_or_default();
        let name =
            |field: &str| self.token_id(field).and_then(|id| tokens.get(id as usize)).and_then(MetaValue::as_str);
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name("bos_token_id"),
            "eos_token": name("eos_token_id"),
            "unk_token": name("unknown_token_id"),
            "pad_token": name("padding_token_id"),
            "add_bos_token": self.metadata.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(false),
            "chat_template": self.chat_template(),
        })
    }
}
