//! Reading Hugging Face safetensors checkpoints into burn tensors.
//!
//! A checkpoint is one `model.safetensors` or shards listed in `model.safetensors.index.json`.
//! Tensors stored in f32, f16 or bf16 are converted to f32 as they are taken. A [`WeightMap`]
//! records which keys were taken: a missing key, a shape mismatch and (at [`WeightMap::finish`])
//! an unused key are errors that name the key, so a wrong key table cannot load silently.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, Linear, RmsNorm};
use burn::tensor::{Device, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::gguf::GgufFile;

/// Errors of checkpoint loading; each names the file or key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file ({message}); re-download or re-save the checkpoint")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    BadIndex { path: PathBuf, message: String },

    #[error(
        "{dir}: no weights found; expected `model.safetensors` or `model.safetensors.index.json` \
         (PyTorch `.bin` checkpoints are not read: convert them with transformers' \
         `save_pretrained(..., safe_serialization=True)`)"
    )]
    NoWeights { dir: PathBuf },

    #[error("{path}: missing weight `{key}` (expected shape {expected:?})")]
    MissingKey { path: PathBuf, key: String, expected: Vec<usize> },

    #[error(
        "{path}: weight `{key}` has shape {found:?} but the config implies {expected:?}; is config.json the one that goes with these weights?"
    )]
    ShapeMismatch { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{path}: weight `{key}` is stored as {dtype:?}; only F32, F16 and BF16 are read")]
    UnsupportedDtype { path: PathBuf, key: String, dtype: String },

    #[error(
        "{path}: {count} weights were not used by the model, for example `{first}`; the checkpoint does not match its config.json or architecture"
    )]
    UnusedKeys { path: PathBuf, count: usize, first: String },

    #[error("{path}: {message}")]
    BadConfig { path: PathBuf, message: String },

    #[error("{path}: not a readable GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },

    #[error("model {reference:?}: {message}")]
    BadReference { reference: String, message: String },
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Where one tensor lives.
enum Entry {
    /// In a safetensors shard, under its own key.
    Safetensors { shard: usize },
    /// In the GGUF file, under llama.cpp's name; `unpermute_heads` undoes the converter's
    /// rotary row permutation of a query or key projection with that many heads.
    Gguf { name: String, unpermute_heads: Option<usize> },
}

/// The tensors of a checkpoint, taken one by one into modules.
pub struct WeightMap {
    dir: PathBuf,
    shards: Vec<Shard>,
    gguf: Option<GgufFile>,
    entries: BTreeMap<String, Entry>,
    taken: BTreeSet<String>,
    /// Keys that are known buffers rather than weights (GPT-Neo's causal-mask `attn.bias`, old
    /// Llama checkpoints' `rotary_emb.inv_freq`): present in some checkpoints, never used.
    ignored_suffixes: Vec<&'static str>,
    /// Keys under these prefixes belong to parts of a checkpoint this model does not have (a
    /// masked-LM head, a pooler) and are skipped.
    ignored_prefixes: Vec<&'static str>,
    device: Device,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io { path: path.to_path_buf(), source }
}

impl WeightMap {
    /// Opens the safetensors weights in `dir` (one file, or the shards of its index).
    pub fn open(dir: &Path, device: &Device) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(&index)?.into_iter().map(|name| dir.join(name)).collect()
        } else {
            return Err(LoadError::NoWeights { dir: dir.to_path_buf() });
        };
        Self::open_files(dir, &files, device)
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(dir: &Path, files: &[PathBuf], device: &Device) -> Result<Self, LoadError> {
        let mut shards = Vec::new();
        let mut entries = BTreeMap::new();
        for path in files {
            let file = File::open(path).map_err(io_error(path))?;
            // SAFETY: the file is opened read-only and not modified while mapped; a checkpoint
            // changed underneath a running process is outside what any loader can guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_error(path))?;
            let tensors = SafeTensors::deserialize(&mmap)
                .map_err(|error| LoadError::Safetensors { path: path.clone(), message: error.to_string() })?;
            for name in tensors.names() {
                entries.insert(name.to_string(), Entry::Safetensors { shard: shards.len() });
            }
            shards.push(Shard { path: path.clone(), mmap });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            gguf: None,
            entries,
            taken: BTreeSet::new(),
            ignored_suffixes: Vec::new(),
            ignored_prefixes: Vec::new(),
            device: device.clone(),
        })
    }

    /// A checkpoint read from a GGUF file: `keys` maps each Hugging Face key to the file's tensor
    /// name and, for rotary query/key projections, the head count whose row permutation to undo.
    /// Tensors of the file that no key names stay listed under their own names, so that
    /// [`WeightMap::finish`] reports them as unused.
    pub fn from_gguf(file: GgufFile, keys: BTreeMap<String, (String, Option<usize>)>, device: &Device) -> Self {
        let mapped: BTreeSet<&String> = keys.values().map(|(name, _)| name).collect();
        let unmapped: Vec<String> = file.tensors.keys().filter(|name| !mapped.contains(name)).cloned().collect();
        let mut entries: BTreeMap<String, Entry> = keys
            .into_iter()
            .filter(|(_, (name, _))| file.tensors.contains_key(name))
            .map(|(key, (name, unpermute_heads))| (key, Entry::Gguf { name, unpermute_heads }))
            .collect();
        for name in unmapped {
            entries.insert(name.clone(), Entry::Gguf { name, unpermute_heads: None });
        }
        Self {
            dir: file.path().to_path_buf(),
            shards: Vec::new(),
            gguf: Some(file),
            entries,
            taken: BTreeSet::new(),
            ignored_suffixes: Vec::new(),
            ignored_prefixes: Vec::new(),
            device: device.clone(),
        }
    }

    /// Declares keys ending in these suffixes as known non-weight buffers: they are not taken and
    /// not reported as unused.
    pub fn ignore_suffixes(mut self, suffixes: &[&'static str]) -> Self {
        self.ignored_suffixes.extend_from_slice(suffixes);
        self
    }

    /// Declares keys starting with these prefixes as parts of the checkpoint this model does not
    /// use (a masked-LM head, say): they are not reported as unused.
    pub fn ignore_prefixes(mut self, prefixes: &[&'static str]) -> Self {
        self.ignored_prefixes.extend_from_slice(prefixes);
        self
    }

    /// The directory the checkpoint was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the checkpoint has `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    fn error_path(&self, key: &str) -> PathBuf {
        match self.entries.get(key) {
            Some(Entry::Safetensors { shard }) => self.shards[*shard].path.clone(),
            _ => self.dir.clone(),
        }
    }

    /// The stored shape of `key`.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        match self.entries.get(key)? {
            Entry::Safetensors { shard } => {
                let tensors = SafeTensors::deserialize(&self.shards[*shard].mmap).ok()?;
                Some(tensors.tensor(key).ok()?.shape().to_vec())
            }
            Entry::Gguf { name, .. } => Some(self.gguf.as_ref()?.tensors.get(name)?.shape.clone()),
        }
    }

    /// Reads `key` as f32 values, checking that its shape is `expected`.
    pub fn take_values(&mut self, key: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let Some(entry) = self.entries.get(key) else {
            return Err(LoadError::MissingKey {
                path: self.dir.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
            });
        };
        let shard = match entry {
            Entry::Safetensors { shard } => &self.shards[*shard],
            Entry::Gguf { name, unpermute_heads } => {
                let file = self.gguf.as_ref().expect("GGUF entries come with their file");
                let found = &file.tensors[name].shape;
                if found.as_slice() != expected {
                    return Err(LoadError::ShapeMismatch {
                        path: self.dir.clone(),
                        key: format!("{name}` (`{key}`"),
                        expected: expected.to_vec(),
                        found: found.clone(),
                    });
                }
                let values = file.hf_values(name, *unpermute_heads)?;
                self.taken.insert(key.to_string());
                return Ok(values);
            }
        };
        let tensors = SafeTensors::deserialize(&shard.mmap)
            .map_err(|error| LoadError::Safetensors { path: shard.path.clone(), message: error.to_string() })?;
        let view = tensors
            .tensor(key)
            .map_err(|error| LoadError::Safetensors { path: shard.path.clone(), message: error.to_string() })?;
        if view.shape() != expected {
            return Err(LoadError::ShapeMismatch {
                path: self.error_path(key),
                key: key.to_string(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(LoadError::UnsupportedDtype {
                    path: shard.path.clone(),
                    key: key.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        self.taken.insert(key.to_string());
        Ok(values)
    }

    /// Takes `key` as a tensor of the stored shape `expected`.
    pub fn tensor<const D: usize>(&mut self, key: &str, expected: [usize; D]) -> Result<Tensor<D>, LoadError> {
        let values = self.take_values(key, &expected)?;
        Ok(Tensor::from_data(TensorData::new(values, expected), &self.device))
    }

    /// Takes a PyTorch `nn.Linear` (`{prefix}.weight` of shape [out, in], optional
    /// `{prefix}.bias`) as a burn [`Linear`], whose weight is [in, out].
    pub fn linear(&mut self, prefix: &str, d_input: usize, d_output: usize, bias: bool) -> Result<Linear, LoadError> {
        let stored = self.take_values(&format!("{prefix}.weight"), &[d_output, d_input])?;
        let mut transposed = vec![0.0f32; stored.len()];
        for out in 0..d_output {
            for inp in 0..d_input {
                transposed[inp * d_output + out] = stored[out * d_input + inp];
            }
        }
        let weight = Tensor::from_data(TensorData::new(transposed, [d_input, d_output]), &self.device);
        let bias =
            if bias { Some(Param::from_tensor(self.tensor(&format!("{prefix}.bias"), [d_output])?)) } else { None };
        Ok(Linear { weight: Param::from_tensor(weight), bias })
    }

    /// Takes an `nn.Embedding` (`{prefix}.weight`, [count, dim]).
    pub fn embedding(&mut self, prefix: &str, count: usize, dim: usize) -> Result<Embedding, LoadError> {
        Ok(Embedding { weight: Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [count, dim])?) })
    }

    /// Takes an `nn.LayerNorm` (`{prefix}.weight`, `{prefix}.bias`).
    pub fn layer_norm(&mut self, prefix: &str, dim: usize, epsilon: f64) -> Result<LayerNorm, LoadError> {
        let mut norm = burn::nn::LayerNormConfig::new(dim).with_epsilon(epsilon).init(&self.device);
        norm.gamma = Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [dim])?);
        norm.beta = Some(Param::from_tensor(self.tensor(&format!("{prefix}.bias"), [dim])?));
        Ok(norm)
    }

    /// Takes an RMSNorm (`{prefix}.weight`).
    pub fn rms_norm(&mut self, prefix: &str, dim: usize, epsilon: f64) -> Result<RmsNorm, LoadError> {
        let mut norm = burn::nn::RmsNormConfig::new(dim).with_epsilon(epsilon).init(&self.device);
        norm.gamma = Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [dim])?);
        Ok(norm)
    }

    /// Fails if any key was neither taken nor declared ignorable.
    pub fn finish(self) -> Result<(), LoadError> {
        let unused: Vec<&String> = self
            .entries
            .keys()
            .filter(|key| !self.taken.contains(*key))
            .filter(|key| !self.ignored_suffixes.iter().any(|suffix| key.ends_with(suffix)))
            .filter(|key| !self.ignored_prefixes.iter().any(|prefix| key.starts_with(prefix)))
            .collect();
        match unused.first() {
            None => Ok(()),
            Some(first) => Err(LoadError::UnusedKeys {
                path: self.error_path(first),
                count: unused.len(),
                first: (*first).clone(),
            }),
        }
    }
}

/// The distinct shard file names of a `model.safetensors.index.json`, in order.
pub fn shard_files(index: &Path) -> Result<Vec<String>, LoadError> {
    let text = std::fs::read_to_string(index).map_err(io_error(index))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| LoadError::BadIndex { path: index.to_path_buf(), message: error.to_string() })?;
    let map = json.get("weight_map").and_then(|map| map.as_object()).ok_or_else(|| LoadError::BadIndex {
        path: index.to_path_buf(),
        message: "no `weight_map` object".to_string(),
    })?;
    let mut files: Vec<String> = Vec::new();
    for (key, file) in map {
        let file = file.as_str().ok_or_else(|| LoadError::BadIndex {
            path: index.to_path_buf(),
            message: format!("`weight_map.{key}` is not a file name"),
        })?;
        // The name is joined to the checkpoint directory (or fetched from the hub into its
        // cache): a separator or `..` would read, or download to, a file outside it.
        let plain = !file.contains(['/', '\\'])
            && !file.contains("..")
            && file.len() > ".safetensors".len()
            && file.ends_with(".safetensors");
        if !plain {
            return Err(LoadError::BadIndex {
                path: index.to_path_buf(),
                message: format!(
                    "`weight_map.{key}` = {file:?} is not a shard file name: it must be a plain file name in the checkpoint directory (no '/', '\\' or '..') ending in .safetensors"
                ),
            });
        }
        if !files.iter().any(|known| known == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files)
}

/// Collects tensors under their Hugging Face keys and writes them as one `model.safetensors`
/// (f32, with the `{"format": "pt"}` metadata transformers expects).
#[derive(Default)]
pub struct WeightWriter {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Every linear added, by its Hugging Face prefix, with its LoRA factors: the key table
    /// PEFT's adapter files use (`crate::lora`).
    linears: Vec<crate::lora::LinearEntry>,
    /// Record the linears only, reading no values (listing adapters must not copy the model).
    keys_only: bool,
}

fn host_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor data")
}

impl WeightWriter {
    /// Adds a tensor under `key`.
    pub fn tensor<const D: usize>(&mut self, key: &str, tensor: Tensor<D>) {
        if self.keys_only {
            return;
        }
        let shape = tensor.dims().to_vec();
        self.tensors.push((key.to_string(), shape, host_values(tensor)));
    }

    /// A writer that records which linears (and LoRA adapters) an export adds, and no values.
    pub(crate) fn keys_only() -> Self {
        Self { keys_only: true, ..Self::default() }
    }

    /// The linears added so far, in order.
    pub(crate) fn linears(&self) -> &[crate::lora::LinearEntry] {
        &self.linears
    }

    /// Adds a burn [`Linear`] as a PyTorch `nn.Linear` (weight transposed to [out, in]); a
    /// LoRA-adapted weight is written merged (base + scale A B).
    pub fn linear(&mut self, prefix: &str, linear: &Linear) {
        self.linears.push(crate::lora::LinearEntry::of(prefix, linear));
        if self.keys_only {
            return;
        }
        let weight = linear.weight.val();
        let [d_input, d_output] = weight.dims();
        let values = host_values(weight);
        let mut transposed = vec![0.0f32; values.len()];
        for inp in 0..d_input {
            for out in 0..d_output {
                transposed[out * d_input + inp] = values[inp * d_output + out];
            }
        }
        self.tensors.push((format!("{prefix}.weight"), vec![d_output, d_input], transposed));
        if let Some(bias) = &linear.bias {
            self.tensor(&format!("{prefix}.bias"), bias.val());
        }
    }

    /// Drops what was added under `prefix` (`{prefix}.weight`, `{prefix}.bias`, its linear entry).
    pub fn remove(&mut self, prefix: &str) {
        let (weight, bias) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        self.tensors.retain(|(key, _, _)| *key != weight && *key != bias);
        self.linears.retain(|linear| linear.prefix != prefix);
    }

    /// Adds an embedding table.
    pub fn embedding(&mut self, prefix: &str, embedding: &Embedding) {
        self.tensor(&format!("{prefix}.weight"), embedding.weight.val());
    }

    /// Adds a LayerNorm.
    pub fn layer_norm(&mut self, prefix: &str, norm: &LayerNorm) {
        self.tensor(&format!("{prefix}.weight"), norm.gamma.val());
        if let Some(beta) = &norm.beta {
            self.tensor(&format!("{prefix}.bias"), beta.val());
        }
    }

    /// Adds an RMSNorm.
    pub fn rms_norm(&mut self, prefix: &str, norm: &RmsNorm) {
        self.tensor(&format!("{prefix}.weight"), norm.gamma.val());
    }

    /// Writes `path` through a temporary file and a rename.
    pub fn write(&self, path: &Path) -> Result<(), LoadError> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(key, shape, values)| {
                (key.clone(), shape.clone(), values.iter().flat_map(|v| v.to_le_bytes()).collect())
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(key, shape, data)| {
                let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                    .map_err(|error| LoadError::Safetensors { path: path.to_path_buf(), message: error.to_string() })?;
                Ok((key.clone(), view))
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let temporary = path.with_extension("safetensors.tmp");
        safetensors::serialize_to_file(views, Some(metadata), &temporary)
            .map_err(|error| LoadError::Safetensors { path: temporary.clone(), message: error.to_string() })?;
        std::fs::rename(&temporary, path).map_err(io_error(path))
    }
}
