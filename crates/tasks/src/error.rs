use std::path::PathBuf;

use crate::Split;

/// Everything that can go wrong while obtaining problems. Each message names the file, line,
/// row or field at fault and says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path}:{line}: not a JSON object with string fields \"question\" and \"answer\": {message}; \
         fix or remove that line"
    )]
    BadJsonLine { path: PathBuf, line: usize, message: String },

    #[error(
        "{origin}, row {row}: the gold answer has no final line `#### N`; every GSM8K answer ends \
         with one (is this really a GSM8K file?)"
    )]
    MissingGoldAnswer { origin: String, row: usize },

    #[error("{origin}, row {row}: the gold answer `#### {raw}` is not a number; fix the row or remove it")]
    BadGoldAnswer { origin: String, row: usize, raw: String },

    #[error("{origin}: the {split} split is empty; point cotlab at a file that has problems in it")]
    EmptySplit { split: Split, origin: String },

    #[error("{path}: not a readable GSM8K Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },

    #[error(
        "cannot fetch `{file}` of the dataset `{repo}` from the Hugging Face hub: {message}. \
         Without network access, download GSM8K elsewhere (the `{repo}` dataset repository or \
         the JSONL files of openai/grade-school-math) and point cotlab at the local copy: \
         `source = {{ path = \"/path/to/gsm8k\" }}` in the study file's [task] section, or \
         `--gsm8k <dir>` (a directory holding train/test `.jsonl` or `.parquet` files)"
    )]
    Hub { repo: String, file: String, message: String },

    #[error(
        "{path}: no GSM8K {split} split found; expected `{split}.jsonl`, \
         `{split}-00000-of-00001.parquet` or `main/{split}-00000-of-00001.parquet` in it"
    )]
    SplitNotFound { path: PathBuf, split: Split },

    #[error(
        "{path} is one file, which would be read as both the train and the test split (training on the test problems); \
         give both files, `source = {{ files = {{ train = \"train.jsonl\", test = \"test.jsonl\" }} }}`, \
         or a directory holding `train.jsonl` and `test.jsonl`"
    )]
    OneFileForBothSplits { path: PathBuf },

    #[error("unknown split `{name}`; the splits are `train` and `test`")]
    UnknownSplit { name: String },

    #[error("synthetic arithmetic config, field `{field}`: {message}")]
    BadSyntheticConfig { field: &'static str, message: String },

    #[error(
        "synthetic arithmetic: could only generate {generated} distinct problems of the {wanted} \
         asked for; widen `min_operand`..`max_operand`, raise `max_operations`, or ask for fewer"
    )]
    TooFewDistinctProblems { wanted: usize, generated: usize },
}
