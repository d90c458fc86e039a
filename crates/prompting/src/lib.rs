//! Prompts for cotlab: the answer-format templates ([`Template`]), checkpoints' own chat
//! templates rendered as transformers renders them ([`ChatTemplate`]), and few-shot
//! chain-of-thought prompts built from train exemplars ([`PromptBuilder`]).
//!
//! Architecture invariant: this crate does no tensor work and never reads test problems for
//! exemplars ([`sample_exemplars`] refuses a test split).

pub mod chat;
pub mod few_shot;
pub mod template;

use std::path::PathBuf;

pub use chat::{ChatTemplate, Message, RenderOptions, Role};
pub use few_shot::{PromptBuilder, sample_exemplars};
pub use template::Template;

/// Errors of prompt building; each names the file or value at fault and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{origin}: not a usable tokenizer_config.json: {message}")]
    BadTokenizerConfig { origin: String, message: String },

    #[error("{origin}: the chat template failed: {message}")]
    ChatTemplate { origin: String, message: String },

    #[error(
        "few-shot exemplars must come from the train split, not {split}: exemplars from test \
         problems leak answers into the evaluation"
    )]
    ExemplarsNotFromTrain { split: tasks::Split },

    #[error("asked for {k} few-shot exemplars but the train split has only {available}; lower k")]
    TooManyExemplars { k: usize, available: usize },
}
