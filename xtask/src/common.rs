//! Helpers shared by subcommands.

use std::path::{Path, PathBuf};

use anyhow::Context;
use policy_models::{BackendKind, CausalLm, ModelSource};

/// The dtype a policy computes in (`--dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ComputeDtype {
    /// f32 (the CPU default).
    #[default]
    F32,
    /// bfloat16 weights and activations, f32 logits (for GPU backends; flex runs it too).
    Bf16,
}

/// Loads a policy checkpoint named by a directory or hub id on `backend`, computing in `dtype`;
/// returns its local directory too (where the tokenizer lives).
pub fn load_policy(model: &str, backend: BackendKind, dtype: ComputeDtype) -> anyhow::Result<(PathBuf, CausalLm)> {
    let device = backend.device()?;
    let dir = ModelSource::parse(model)?.resolve()?;
    let policy = CausalLm::load_dir(&dir, &device).with_context(|| format!("loading {}", dir.display()))?;
    let policy = match dtype {
        ComputeDtype::F32 => policy,
        ComputeDtype::Bf16 => policy.with_compute_dtype(burn::tensor::FloatDType::BF16),
    };
    Ok((dir, policy))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader never sees a half-written file and an interrupted write leaves the old one intact.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let temporary = dir.join(format!(".{}.tmp", path.file_name().and_then(|name| name.to_str()).unwrap_or("output")));
    std::fs::write(&temporary, bytes).with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot move {} to {}", temporary.display(), path.display()))?;
    Ok(())
}
