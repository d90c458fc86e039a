//! Hugging Face chat templates, rendered with minijinja as Hugging Face's Rust servers do, so
//! that the text equals what transformers' `apply_chat_template(..., tokenize=False)` gives.
//!
//! transformers renders with Jinja2 and `trim_blocks`, `lstrip_blocks` and the loop-controls
//! extension; it passes the special tokens (`bos_token`, `eos_token`, ...) as variables and
//! defines `raise_exception`, `strftime_now` and a `tojson` filter that writes JSON the way
//! Python's `json.dumps(..., ensure_ascii=False)` does. All of that is reproduced here.

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::PromptError;

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the whole conversation.
    System,
    /// The person asking.
    User,
    /// The model.
    Assistant,
}

/// One turn of a conversation, serialised as transformers expects (`{"role", "content"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl Message {
    /// A turn of `role` saying `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}

/// Options of one rendering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderOptions {
    /// End with the header of an assistant turn, so the model's continuation is its answer.
    pub add_generation_prompt: bool,
    /// Extra template variables, as keyword arguments of `apply_chat_template` (Llama 3.2's
    /// `date_string`, say).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A checkpoint's chat template with the special tokens it refers to.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    source: String,
    special_tokens: serde_json::Map<String, serde_json::Value>,
    origin: String,
}

/// A special token in `tokenizer_config.json` is a string or an `AddedToken` object.
fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Object(object) => object.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Reads a checkpoint directory's chat template as transformers does: `chat_template.jinja`
    /// when present (transformers 5 saves the template there, and prefers it to the field),
    /// else `tokenizer_config.json`'s `chat_template`; the special tokens come from
    /// `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, PromptError> {
        let config_path = dir.join("tokenizer_config.json");
        let jinja_path = dir.join("chat_template.jinja");
        let config: serde_json::Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|source| PromptError::Io { path: config_path.clone(), source })?;
            serde_json::from_str(&text).map_err(|error| PromptError::BadTokenizerConfig {
                origin: config_path.display().to_string(),
                message: error.to_string(),
            })?
        } else {
            serde_json::Value::Object(serde_json::Map::new())
        };
        if !jinja_path.is_file() {
            if !config_path.is_file() {
                return Err(PromptError::BadTokenizerConfig {
                    origin: dir.display().to_string(),
                    message: "neither chat_template.jinja nor tokenizer_config.json: this checkpoint has no chat template; use a plain-text template".to_string(),
                });
            }
            return Self::from_tokenizer_config_json(&config, &config_path.display().to_string());
        }
        let source = std::fs::read_to_string(&jinja_path)
            .map_err(|source| PromptError::Io { path: jinja_path.clone(), source })?;
        let mut config = config;
        config["chat_template"] = source.into();
        Self::from_tokenizer_config_json(&config, &jinja_path.display().to_string())
    }

    /// Reads the `chat_template` and special tokens of a checkpoint's `tokenizer_config.json`
    /// (the field alone; [`ChatTemplate::from_dir`] also reads `chat_template.jinja`).
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, PromptError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| PromptError::Io { path: path.to_path_buf(), source })?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|error| {
            PromptError::BadTokenizerConfig { origin: path.display().to_string(), message: error.to_string() }
        })?;
        Self::from_tokenizer_config_json(&config, &path.display().to_string())
    }

    /// As [`ChatTemplate::from_tokenizer_config`], from parsed JSON; `origin` names it in errors.
    pub fn from_tokenizer_config_json(config: &serde_json::Value, origin: &str) -> Result<Self, PromptError> {
        let bad = |message: &str| PromptError::BadTokenizerConfig {
            origin: origin.to_string(),
            message: message.to_string(),
        };
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(source)) => source.clone(),
            // Some checkpoints list named templates; the one named "default" is the chat template.
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|entry| entry.get("name").and_then(|name| name.as_str()) == Some("default"))
                .and_then(|entry| entry.get("template")?.as_str())
                .ok_or_else(|| bad("`chat_template` is a list without an entry named \"default\""))?
                .to_string(),
            _ => {
                return Err(bad(
                    "no chat template: no `chat_template` field here, and no chat_template.jinja was read (transformers 5 saves it there; load the checkpoint directory); use a plain-text template",
                ));
            }
        };
        let mut special_tokens = serde_json::Map::new();
        for name in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
            if let Some(text) = config.get(name).and_then(token_text) {
                special_tokens.insert(name.to_string(), text.into());
            }
        }
        if let Some(serde_json::Value::Array(tokens)) = config.get("additional_special_tokens") {
            let texts: Vec<serde_json::Value> = tokens.iter().filter_map(token_text).map(Into::into).collect();
            special_tokens.insert("additional_special_tokens".to_string(), texts.into());
        }
        let template = Self { source, special_tokens, origin: origin.to_string() };
        // Compile once now, so a broken template is reported where it is loaded.
        template.environment()?;
        Ok(template)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> Result<Environment<'_>, PromptError> {
        let mut environment = Environment::new();
        let syntax = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        environment.set_syntax(syntax.expect("the default delimiters are valid"));
        minijinja_contrib::add_to_environment(&mut environment);
        environment.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        environment.add_function("strftime_now", |format: String| -> String {
            jiff::Zoned::now().strftime(&format).to_string()
        });
        environment.add_filter("tojson", python_tojson);
        environment.add_template("chat", &self.source).map_err(|error| self.render_error(error))?;
        Ok(environment)
    }

    fn render_error(&self, error: Error) -> PromptError {
        PromptError::ChatTemplate { origin: self.origin.clone(), message: format!("{error:#}") }
    }

    /// Renders `messages` as transformers' `apply_chat_template(messages, tokenize=False, ...)`.
    pub fn render(&self, messages: &[Message], options: &RenderOptions) -> Result<String, PromptError> {
        let environment = self.environment()?;
        let template = environment.get_template("chat").map_err(|error| self.render_error(error))?;
        let mut context = self.special_tokens.clone();
        context.insert("messages".to_string(), serde_json::to_value(messages).expect("messages serialise"));
        context.insert("add_generation_prompt".to_string(), options.add_generation_prompt.into());
        for (key, value) in &options.extra {
            context.insert(key.clone(), value.clone());
        }
        template.render(Value::from(Serde(&context))).map_err(|error| self.render_error(error))
    }
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`, that is
/// `", "` and `": "` separators when not indented, and no HTML escaping (unlike minijinja's own).
fn python_tojson(value: Value, indent: Option<usize>) -> Result<Value, Error> {
    let json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|error| Error::new(ErrorKind::InvalidOperation, format!("tojson: {error}")))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(value: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value {
        serde_json::Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        serde_json::Value::Object(entries) if !entries.is_empty() => {
            out.push('{');
            for (index, (key, item)) in entries.iter().enumerate() {
                if index > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let value = Value::from(Serde(serde_json::json!({"name": "add", "args": [1, "<b>"], "empty": {}})));
        // serde_json keeps keys sorted without the preserve_order feature; Python keeps insertion
        // order, which for these keys is the same once sorted by the caller.
        let compact = python_tojson(value.clone(), None).unwrap().to_string();
        assert_eq!(compact, r#"{"args": [1, "<b>"], "empty": {}, "name": "add"}"#);
        let indented = python_tojson(Value::from(Serde(serde_json::json!({"a": [1]}))), Some(2)).unwrap().to_string();
        assert_eq!(indented, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn a_config_without_a_template_is_a_clear_error() {
        let error =
            ChatTemplate::from_tokenizer_config_json(&serde_json::json!({"eos_token": "x"}), "cfg.json").unwrap_err();
        assert!(error.to_string().contains("cfg.json") && error.to_string().contains("chat_template"), "{error}");
        let broken = serde_json::json!({"chat_template": "{% for m in messages %}"});
        let error = ChatTemplate::from_tokenizer_config_json(&broken, "cfg.json").unwrap_err();
        assert!(matches!(error, PromptError::ChatTemplate { .. }), "{error}");
    }

    #[test]
    fn raise_exception_surfaces_as_an_error() {
        let config = serde_json::json!({"chat_template": "{{ raise_exception('only user turns') }}"});
        let template = ChatTemplate::from_tokenizer_config_json(&config, "cfg.json").unwrap();
        let error = template.render(&[], &RenderOptions::default()).unwrap_err();
        assert!(error.to_string().contains("only user turns"), "{error}");
    }
}
