//! Prompts against the strings transformers renders (fixture made by
//! `tools/fixtures/make_prompt_fixtures.py` from the real tokenizer configs in
//! `../shared/tokenizers/`).

use std::path::PathBuf;

use prompting::{ChatTemplate, Message, PromptBuilder, RenderOptions, Template};
use serde::Deserialize;
use tasks::Problem;

#[derive(Deserialize)]
struct Fixture {
    exemplars: Vec<Problem>,
    question: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    chat_template: String,
    template: Option<Template>,
    k: Option<usize>,
    extra: serde_json::Map<String, serde_json::Value>,
    add_generation_prompt: bool,
    messages: Vec<Message>,
    plain_text: Option<String>,
    rendered: String,
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prompts.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tokenizer_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("COTLAB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    root.join("tokenizers").join(name)
}

#[test]
fn every_template_and_chat_template_renders_as_transformers_does() {
    let fixture = fixture();
    assert_eq!(fixture.cases.len(), 21);
    for case in &fixture.cases {
        // SmolLM2's folder (saved by transformers 5) keeps its template in chat_template.jinja.
        let chat = ChatTemplate::from_dir(&tokenizer_dir(&case.chat_template)).unwrap();
        let label = format!("{} / {:?} / k={:?}", case.chat_template, case.template, case.k);
        // The chat template alone, on the reference conversation.
        let options = RenderOptions { add_generation_prompt: case.add_generation_prompt, extra: case.extra.clone() };
        assert_eq!(chat.render(&case.messages, &options).unwrap(), case.rendered, "{label}: chat rendering");
        let (Some(template), Some(k)) = (case.template, case.k) else { continue };
        // cotlab's own prompt builder produces the same conversation, plain text and rendering.
        let exemplars = fixture.exemplars[..k].to_vec();
        let plain = PromptBuilder::new(template).with_exemplars(exemplars.clone());
        assert_eq!(plain.messages(&fixture.question), case.messages, "{label}: messages");
        assert_eq!(plain.render(&fixture.question).unwrap(), *case.plain_text.as_ref().unwrap(), "{label}: plain text");
        let chat_builder = plain.clone().with_chat_template(chat, case.extra.clone());
        assert_eq!(chat_builder.render(&fixture.question).unwrap(), case.rendered, "{label}: builder rendering");
    }
}

#[test]
fn plain_text_prompt_plus_target_continues_the_exemplar_pattern() {
    let fixture = fixture();
    for template in Template::ALL {
        let builder = PromptBuilder::new(template).with_exemplars(fixture.exemplars[..1].to_vec());
        let two_shot = PromptBuilder::new(template).with_exemplars(fixture.exemplars.to_vec()).render("next?").unwrap();
        // Prompt for the second exemplar + its target is exactly the two-shot prompt's prefix.
        let second = &fixture.exemplars[1];
        let completed = builder.render(&second.question).unwrap() + &builder.target(second);
        assert!(two_shot.starts_with(&completed), "{template:?}:\n{completed}\n---\n{two_shot}");
    }
}

#[test]
fn the_real_llama_template_uses_todays_date_when_none_is_given() {
    let chat = ChatTemplate::from_dir(&tokenizer_dir("llama-3.2-instruct")).unwrap();
    let text = chat
        .render(
            &[Message::new(prompting::Role::User, "hi")],
            &RenderOptions { add_generation_prompt: true, ..Default::default() },
        )
        .unwrap();
    let today = jiff::Zoned::now().strftime("%d %b %Y").to_string();
    assert!(text.contains(&format!("Today Date: {today}\n")), "{text}");
}

#[test]
fn chat_template_jinja_is_preferred_to_the_config_field_as_transformers_5_does() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        serde_json::json!({"chat_template": "from the config: {{ messages[0].content }}", "eos_token": "</s>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let messages = [Message::new(prompting::Role::User, "hi")];
    let render = |chat: ChatTemplate| chat.render(&messages, &RenderOptions::default()).unwrap();
    assert_eq!(render(ChatTemplate::from_dir(dir.path()).unwrap()), "from the config: hi");
    std::fs::write(dir.path().join("chat_template.jinja"), "from the file: {{ messages[0].content }}{{ eos_token }}")
        .unwrap();
    assert_eq!(render(ChatTemplate::from_dir(dir.path()).unwrap()), "from the file: hi</s>");
    // Neither: the error names the checkpoint and the way out.
    let empty = tempfile::tempdir().unwrap();
    let error = ChatTemplate::from_dir(empty.path()).unwrap_err().to_string();
    assert!(
        error.contains(&empty.path().display().to_string())
            && error.contains("chat_template.jinja")
            && error.contains("plain-text"),
        "{error}"
    );
}
