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
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot move {} to {}", temporary.display(), path.display()))?;
    Ok(())
}

/// The temporary sibling a directory artefact `dir` is written into, `.<name>.partial`, before
/// [`install_dir`] renames it into place: `dir` then exists only complete.
pub fn partial_dir(dir: &Path) -> PathBuf {
    let name = dir.file_name().and_then(|name| name.to_str()).unwrap_or("output");
    dir.with_file_name(format!(".{name}.partial"))
}

/// Removes what an interrupted run left in `dir`'s [`partial_dir`]; returns its path when there
/// was something to remove.
pub fn remove_partial(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let partial = partial_dir(dir);
    if !partial.exists() {
        return Ok(None);
    }
    std::fs::remove_dir_all(&partial).with_context(|| {
        format!("cannot remove {}, left by an interrupted run; remove it by hand", partial.display())
    })?;
    Ok(Some(partial))
}

/// Moves the completed `partial` to `dir`, replacing what `dir` held.
pub fn install_dir(partial: &Path, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {} to replace it", dir.display()))?;
    }
    std::fs::rename(partial, dir).with_context(|| format!("cannot move {} to {}", partial.display(), dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_artefact_appears_only_complete() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("base");
        let partial = partial_dir(&dir);
        assert_eq!(partial, root.path().join(".base.partial"));
        assert_eq!(remove_partial(&dir).unwrap(), None);
        // An interrupted run: weights written, the rest not; nothing at `dir`.
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("model.safetensors"), b"half").unwrap();
        assert!(!dir.exists());
        assert_eq!(remove_partial(&dir).unwrap(), Some(partial.clone()));
        assert!(!partial.exists());
        // A complete one replaces what was there.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("old"), b"").unwrap();
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("model.safetensors"), b"new").unwrap();
        install_dir(&partial, &dir).unwrap();
        assert!(!partial.exists() && !dir.join("old").exists());
        assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), b"new");
    }
}
