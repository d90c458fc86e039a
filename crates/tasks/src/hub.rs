//! Fetching files from the Hugging Face hub into its local cache.
//!
//! The cache is the one `huggingface_hub` uses (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`),
//! so files downloaded by Python tools are found here too. `HF_HUB_OFFLINE=1` forbids network
//! access: then only cached files are returned. Policy and reward-model checkpoints are fetched
//! through the same function.

use std::io::IsTerminal;
use std::path::PathBuf;

pub use hf_hub::RepoType;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

/// A file that could not be had from the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "`{file}` of `{repo}` (revision `{revision}`) is not in the hub cache ({cache}) and \
         HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it, or use a local copy"
    )]
    OfflineNotCached { repo: String, revision: String, file: String, cache: PathBuf },

    #[error("downloading `{file}` of `{repo}` (revision `{revision}`) failed: {message}")]
    Download { repo: String, revision: String, file: String, message: String },
}

/// True when `HF_HUB_OFFLINE` asks for no network access (`1`, `true`, `yes` or `on`).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|value| matches!(value.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Returns the local path of `file` in the hub repository `repo` at `revision`, from the cache
/// when it is there, else downloaded into the cache (unless offline).
pub fn fetch(repo: &str, repo_type: RepoType, revision: &str, file: &str) -> Result<PathBuf, HubError> {
    let hub_repo = Repo::with_revision(repo.to_string(), repo_type, revision.to_string());
    let cache = Cache::from_env();
    if let Some(path) = cache.repo(hub_repo.clone()).get(file) {
        return Ok(path);
    }
    if offline() {
        return Err(HubError::OfflineNotCached {
            repo: repo.to_string(),
            revision: revision.to_string(),
            file: file.to_string(),
            cache: cache.path().clone(),
        });
    }
    let download_error = |message: String| HubError::Download {
        repo: repo.to_string(),
        revision: revision.to_string(),
        file: file.to_string(),
        message,
    };
    let api = ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|error| download_error(error.to_string()))?;
    api.repo(hub_repo).get(file).map_err(|error| download_error(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_and_uncached_is_a_clear_error() {
        // SAFETY: this test is the only one in this crate that touches these variables.
        unsafe {
            std::env::set_var("HF_HUB_OFFLINE", "1");
            std::env::set_var("HF_HOME", std::env::temp_dir().join("cotlab-empty-hf-home"));
        }
        let error = fetch("openai/gsm8k", RepoType::Dataset, "main", "main/test-00000-of-00001.parquet").unwrap_err();
        assert!(matches!(error, HubError::OfflineNotCached { .. }));
        let message = error.to_string();
        assert!(message.contains("openai/gsm8k") && message.contains("HF_HUB_OFFLINE"), "{message}");
    }
}
