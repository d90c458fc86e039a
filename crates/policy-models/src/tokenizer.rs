//! Tokenizers of checkpoints: `tokenizer.json` through the tokenizers crate, or `vocab.json` +
//! `merges.txt` when a checkpoint has no `tokenizer.json`, assembled as transformers assembles
//! them (byte-level BPE; Qwen2's split pattern and NFC; RoBERTa's `<s> ... </s>`), with the
//! added tokens of `tokenizer_config.json`; or, with neither, Meta's tiktoken ranks (Llama 3's
//! `original/tokenizer.model`) converted as transformers' `TikTokenConverter` does. End and
//! padding ids come from `config.json`, `generation_config.json` and `tokenizer_config.json`, in
//! that order of preference. The beginning-of-sequence token is the tokenizer's own business,
//! as in transformers: `tokenizer_config.json` names it, and only the post-processor (or
//! `add_bos_token` where there is no `tokenizer.json`) puts it in front of an encoding.
//! `config.json`'s `bos_token_id` is what the model was pretrained with, not a promise that
//! prompts start with it (SmolLM2 declares `<|im_start|>`; GPT-Neo and Qwen2 declare
//! `<|endoftext|>`; none of their tokenizers adds it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Llama 3's pre-tokenization pattern (Meta's `tokenizer.py`; transformers' `TikTokenConverter`).
pub(crate) const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenization pattern (transformers' `PRETOKENIZE_REGEX`).
pub(crate) const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Errors of tokenizer loading and use.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },

    #[error(
        "{dir}: no tokenizer found; expected tokenizer.json, vocab.json with merges.txt, or Meta's tiktoken ranks (original_tokenizer.model or original/tokenizer.model)"
    )]
    NotFound { dir: PathBuf },

    #[error("tokenizer: {0}")]
    Use(String),
}

/// A checkpoint's tokenizer with its special token ids.
#[derive(Debug, Clone)]
pub struct PolicyTokenizer {
    inner: Tokenizer,
    /// The tokenizer's beginning-of-sequence token (transformers' `bos_token_id`):
    /// `tokenizer_config.json`'s `bos_token`, else the token the post-processor prepends.
    /// Naming one does not make encodings start with it; see [`PolicyTokenizer::prepended_bos`].
    pub bos_id: Option<u32>,
    /// Tokens that end generation (`generation_config.json` may list several).
    pub eos_ids: Vec<u32>,
    /// Padding token (falls back to the first end-of-sequence token).
    pub pad_id: Option<u32>,
    /// The token `encode(text, true)` puts first, if the post-processor puts one first.
    prepended_bos: Option<u32>,
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|error| TokenizerError::Load { path: path.to_path_buf(), message: error.to_string() })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| TokenizerError::Load { path: path.to_path_buf(), message: error.to_string() })
}

/// `5`, `[5, 6]` or absent.
fn ids_of(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(number)) => number.as_u64().map(|id| id as u32).into_iter().collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_u64).map(|id| id as u32).collect(),
        _ => Vec::new(),
    }
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Object(object) => object.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl PolicyTokenizer {
    /// Loads the tokenizer of a checkpoint directory.
    pub fn load_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let inner = if dir.join("tokenizer.json").is_file() {
            let path = dir.join("tokenizer.json");
            Tokenizer::from_file(&path).map_err(|error| TokenizerError::Load { path, message: error.to_string() })?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            from_vocab_and_merges(dir, &tokenizer_config)?
        } else if let Some(ranks) = tiktoken_file(dir) {
            from_tiktoken(&ranks, &tokenizer_config)?
        } else {
            return Err(TokenizerError::NotFound { dir: dir.to_path_buf() });
        };
        let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let named = |field: &str| token_text(tokenizer_config.get(field)).and_then(|text| inner.token_to_id(&text));
        let prepended_bos = prepended_token(&inner);
        let bos_id = named("bos_token").or(prepended_bos);
        let mut eos_ids = ids_of(generation.get("eos_token_id"));
        for id in ids_of(config.get("eos_token_id")).into_iter().chain(named("eos_token")) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let pad_id = ids_of(config.get("pad_token_id"))
            .first()
            .or(ids_of(generation.get("pad_token_id")).first())
            .copied()
            .or_else(|| named("pad_token"))
            .or_else(|| eos_ids.first().copied());
        Ok(Self { inner, bos_id, eos_ids, pad_id, prepended_bos })
    }

    /// Wraps a tokenizer built elsewhere (a trained one, say). Whether its encodings start with
    /// `bos_id` is up to `inner`'s post-processor (see [`PolicyTokenizer::prepending_bos`]).
    pub fn new(inner: Tokenizer, bos_id: Option<u32>, eos_ids: Vec<u32>, pad_id: Option<u32>) -> Self {
        let prepended_bos = prepended_token(&inner);
        Self { inner, bos_id, eos_ids, pad_id, prepended_bos }
    }

    /// This tokenizer with `bos` as its beginning-of-sequence token, put in front of every
    /// encoding with special tokens by a post-processor template (as Llama 3's
    /// `tokenizer.json` does), so that a saved copy encodes the same in cotlab and transformers.
    pub fn prepending_bos(mut self, bos: u32) -> Result<Self, TokenizerError> {
        let text = self
            .inner
            .id_to_token(bos)
            .ok_or_else(|| TokenizerError::Use(format!("prepending_bos: no token has id {bos}")))?;
        let template = bos_template(&text, bos).map_err(TokenizerError::Use)?;
        let processor = after(self.inner.get_post_processor(), template);
        self.inner.with_post_processor(Some(processor));
        self.bos_id = Some(bos);
        self.prepended_bos = prepended_token(&self.inner);
        Ok(self)
    }

    /// The token that [`PolicyTokenizer::encode`] with special tokens puts first (Llama 3's
    /// `<|begin_of_text|>`, RoBERTa's `<s>`), if any: the BOS that prompts start with.
    pub fn prepended_bos(&self) -> Option<u32> {
        self.prepended_bos
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (Llama 3's `<|begin_of_text|>`, RoBERTa's `<s>`/`</s>`; nothing for GPT-2, Qwen2 and
    /// SmolLM2), as transformers' `tokenizer(text)` does. Text a chat template rendered already
    /// holds the template's special tokens: encode it without (as transformers and TRL do).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding =
            self.inner.encode(text, add_special_tokens).map_err(|error| TokenizerError::Use(error.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|error| TokenizerError::Use(error.to_string()))
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token's text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, false)
            .map_err(|error| TokenizerError::Load { path: path.to_path_buf(), message: error.to_string() })
    }
}

/// The token a tokenizer's post-processor puts in front of a single sequence, if any.
fn prepended_token(tokenizer: &Tokenizer) -> Option<u32> {
    let encoding = tokenizer.encode("a", true).ok()?;
    (encoding.get_special_tokens_mask().first() == Some(&1)).then(|| encoding.get_ids()[0])
}

/// The post-processor template that puts `bos` in front of each sequence (Llama 3's
/// `tokenizer.json`; transformers' `update_post_processor` with `add_bos_token`).
fn bos_template(bos: &str, id: u32) -> Result<TemplateProcessing, String> {
    let mut template = TemplateProcessing::builder();
    template.try_single(format!("{bos} $A"))?;
    template.try_pair(format!("{bos} $A {bos} $B"))?;
    template.special_tokens(vec![(bos.to_string(), id)]);
    template.build().map_err(|error| error.to_string())
}

/// `template` run after `existing` (the byte-level offsets fix-up, say).
fn after(existing: Option<&PostProcessorWrapper>, template: TemplateProcessing) -> PostProcessorWrapper {
    match existing {
        Some(existing) => ProcessorSequence::new(vec![existing.clone(), template.into()]).into(),
        None => template.into(),
    }
}

/// Meta's tiktoken rank file in a checkpoint directory (Llama 3 repositories ship it as
/// `original/tokenizer.model`; a file of `base64-token rank` lines, unlike SentencePiece's
/// binary `tokenizer.model`).
fn tiktoken_file(dir: &Path) -> Option<PathBuf> {
    ["original_tokenizer.model", "original/tokenizer.model", "tokenizer.model"].iter().map(|name| dir.join(name)).find(
        |path| {
            let Ok(bytes) = std::fs::read(path) else { return false };
            let first = bytes.split(|&byte| byte == b'\n').next().unwrap_or_default();
            std::str::from_utf8(first).is_ok_and(|line| {
                line.split_once(' ')
                    .is_some_and(|(token, rank)| rank.parse::<u32>().is_ok() && BASE64.decode(token).is_ok())
            })
        },
    )
}

/// GPT-2's map from bytes to printable characters (byte-level BPE spells tokens with it).
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[usize::from(byte)] = if printable {
            char::from(byte)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below the surrogates")
        };
    }
    table
}

/// Builds the tokenizer of Meta's tiktoken ranks as transformers' `TikTokenConverter` does (the
/// conversion behind the hub's Llama 3 `tokenizer.json`): vocabulary = ranks in byte-level
/// spelling; merges = every split of a token into two tokens, ordered by the merged token's rank
/// and then the parts' ranks; `ignore_merges` (a whole pre-token in the vocabulary is one
/// token, as tiktoken does); Llama 3's split pattern; the config's added tokens; and the BOS
/// template of the hub's `tokenizer.json` when the config names a BOS token.
fn from_tiktoken(path: &Path, tokenizer_config: &Value) -> Result<Tokenizer, TokenizerError> {
    let load_error = |message: String| TokenizerError::Load { path: path.to_path_buf(), message };
    let text = std::fs::read_to_string(path).map_err(|error| load_error(error.to_string()))?;
    let mut ranks: HashMap<Vec<u8>, u32> = HashMap::new();
    for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.is_empty()) {
        let parsed = line
            .split_once(' ')
            .and_then(|(token, rank)| Some((BASE64.decode(token).ok()?, rank.parse::<u32>().ok()?)));
        let Some((token, rank)) = parsed else {
            return Err(load_error(format!("line {}: expected `<base64 token> <rank>`, found {line:?}", number + 1)));
        };
        ranks.insert(token, rank);
    }
    let table = byte_to_char();
    let spell = |bytes: &[u8]| bytes.iter().map(|&byte| table[usize::from(byte)]).collect::<String>();
    let mut merges: Vec<(u32, u32, u32, String, String)> = Vec::new();
    for (token, &rank) in &ranks {
        for split in 1..token.len() {
            let (left, right) = token.split_at(split);
            if let (Some(&left_rank), Some(&right_rank)) = (ranks.get(left), ranks.get(right)) {
                merges.push((rank, left_rank, right_rank, spell(left), spell(right)));
            }
        }
    }
    merges.sort_unstable_by_key(|&(rank, left, right, _, _)| (rank, left, right));
    let vocab: tokenizers::models::bpe::Vocab = ranks.iter().map(|(token, &rank)| (spell(token), rank)).collect();
    let merges = merges.into_iter().map(|(_, _, _, left, right)| (left, right)).collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(true)
        .build()
        .map_err(|error| load_error(error.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    let split = Split::new(SplitPattern::Regex(LLAMA3_PATTERN.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|error| load_error(error.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    add_config_tokens(&mut tokenizer, tokenizer_config, path)?;
    let byte_level = ByteLevel::new(false, false, false);
    match token_text(tokenizer_config.get("bos_token")) {
        Some(bos) => {
            let id = tokenizer
                .token_to_id(&bos)
                .ok_or_else(|| load_error(format!("the BOS token {bos:?} is not in the vocabulary")))?;
            let template = bos_template(&bos, id).map_err(load_error)?;
            tokenizer.with_post_processor(Some(ProcessorSequence::new(vec![byte_level.into(), template.into()])));
        }
        None => {
            tokenizer.with_post_processor(Some(byte_level));
        }
    }
    Ok(tokenizer)
}

/// Builds a byte-level BPE tokenizer from `vocab.json` + `merges.txt` the way transformers'
/// converters do for the tokenizer class named in `tokenizer_config.json`.
fn from_vocab_and_merges(dir: &Path, tokenizer_config: &Value) -> Result<Tokenizer, TokenizerError> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let load_error = |message: String| TokenizerError::Load { path: vocab.clone(), message };
    let model = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|error| load_error(error.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    let class = tokenizer_config.get("tokenizer_class").and_then(Value::as_str).unwrap_or("GPT2Tokenizer");
    let add_prefix_space = tokenizer_config.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(false);
    if class.starts_with("Qwen2") {
        let split = Split::new(SplitPattern::Regex(QWEN2_PATTERN.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|error| load_error(error.to_string()))?;
        tokenizer.with_normalizer(Some(NFC)).map_err(|error| load_error(error.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(add_prefix_space, true, false).into(),
        ])));
        tokenizer.with_post_processor(Some(ByteLevel::new(add_prefix_space, false, true)));
    } else {
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)));
        tokenizer.with_post_processor(Some(ByteLevel::new(add_prefix_space, true, true)));
    }
    tokenizer.with_decoder(Some(ByteLevel::default()));
    add_config_tokens(&mut tokenizer, tokenizer_config, &vocab)?;
    // Named special tokens already in the vocabulary (GPT-2's `<|endoftext|>`, RoBERTa's `<s>`,
    // `</s>`, `<pad>`, `<unk>`, `<mask>`) must be matched whole, as transformers registers them.
    let class_defaults: &[&str] = if class.starts_with("Roberta") {
        &["<s>", "</s>", "<unk>", "<pad>", "<mask>"]
    } else if class.starts_with("GPT2") {
        &["<|endoftext|>"]
    } else {
        &[]
    };
    let named = ["bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token"]
        .iter()
        .filter_map(|field| token_text(tokenizer_config.get(*field)));
    for content in class_defaults.iter().map(|text| text.to_string()).chain(named) {
        if tokenizer.token_to_id(&content).is_some()
            && tokenizer.get_added_tokens_decoder().values().all(|token| token.content != content)
        {
            // RoBERTa's `<mask>` swallows the space before it.
            let token = AddedToken::from(content.clone(), true).lstrip(content == "<mask>");
            tokenizer.add_special_tokens([token]).map_err(|error| load_error(error.to_string()))?;
        }
    }
    // Without a tokenizer.json, transformers' `add_bos_token: true` puts the BOS in front.
    let add_bos = tokenizer_config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
    if let (true, false, Some(bos)) =
        (add_bos, class.starts_with("Roberta"), token_text(tokenizer_config.get("bos_token")))
    {
        let id = tokenizer.token_to_id(&bos).ok_or_else(|| {
            load_error(format!(
                "tokenizer_config.json: add_bos_token is true but bos_token {bos:?} is not in the vocabulary"
            ))
        })?;
        let template = bos_template(&bos, id).map_err(load_error)?;
        let processor = after(tokenizer.get_post_processor(), template);
        tokenizer.with_post_processor(Some(processor));
    }
    if class.starts_with("Roberta") {
        let id = |text: &str| {
            tokenizer.token_to_id(text).ok_or_else(|| load_error(format!("RoBERTa vocabulary lacks {text}")))
        };
        let processing = RobertaProcessing::new(("</s>".to_string(), id("</s>")?), ("<s>".to_string(), id("<s>")?))
            .trim_offsets(true)
            .add_prefix_space(add_prefix_space);
        tokenizer.with_post_processor(Some(processing));
    }
    Ok(tokenizer)
}

/// Adds the tokens of `tokenizer_config.json`'s `added_tokens_decoder` in id order, so each lands
/// on the id the config gives it (an error when it does not: vocabulary and config disagree).
fn add_config_tokens(tokenizer: &mut Tokenizer, tokenizer_config: &Value, source: &Path) -> Result<(), TokenizerError> {
    let load_error = |message: String| TokenizerError::Load { path: source.to_path_buf(), message };
    let mut added: Vec<(u32, AddedToken)> = Vec::new();
    if let Some(Value::Object(decoder)) = tokenizer_config.get("added_tokens_decoder") {
        for (id, token) in decoder {
            let (Ok(id), Some(content)) = (id.parse::<u32>(), token.get("content").and_then(Value::as_str)) else {
                continue;
            };
            let flag = |name: &str| token.get(name).and_then(Value::as_bool).unwrap_or(false);
            let token = AddedToken::from(content, flag("special"))
                .lstrip(flag("lstrip"))
                .rstrip(flag("rstrip"))
                .single_word(flag("single_word"))
                .normalized(flag("normalized"));
            added.push((id, token));
        }
    }
    added.sort_by_key(|(id, _)| *id);
    for (id, token) in added {
        let content = token.content.clone();
        if token.special {
            tokenizer.add_special_tokens([token]).map_err(|error| load_error(error.to_string()))?;
        } else {
            tokenizer.add_tokens([token]).map_err(|error| load_error(error.to_string()))?;
        }
        let assigned = tokenizer.token_to_id(&content);
        if assigned != Some(id) {
            return Err(load_error(format!(
                "added token {content:?} should have id {id} (tokenizer_config.json) but got {assigned:?}; the vocabulary and the config disagree"
            )));
        }
    }
    Ok(())
}
