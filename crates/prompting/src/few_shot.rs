//! Few-shot chain-of-thought prompts: k worked exemplars drawn from the train split, then the
//! question, in the chosen template, as plain text or through a chat template.

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use tasks::{Problem, Split, SplitProblems};

use crate::chat::{ChatTemplate, Message, RenderOptions, Role};
use crate::{PromptError, Template};

/// Draws `k` distinct exemplars from `pool`, deterministically for `seed`. The pool must be a
/// train split: exemplars drawn from test problems would leak answers into the evaluation.
/// `k = 0` gives none (zero-shot).
pub fn sample_exemplars(pool: &SplitProblems, k: usize, seed: u64) -> Result<Vec<Problem>, PromptError> {
    if pool.split != Split::Train {
        return Err(PromptError::ExemplarsNotFromTrain { split: pool.split });
    }
    if k > pool.len() {
        return Err(PromptError::TooManyExemplars { k, available: pool.len() });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok(sample(&mut rng, pool.len(), k).into_iter().map(|index| pool.problems[index].clone()).collect())
}

/// Builds prompts for questions: the template, its exemplars, and optionally a chat template.
#[derive(Debug, Clone)]
pub struct PromptBuilder {
    template: Template,
    exemplars: Vec<Problem>,
    chat: Option<ChatTemplate>,
    chat_options: RenderOptions,
}

impl PromptBuilder {
    /// A zero-shot builder rendering plain text.
    pub fn new(template: Template) -> Self {
        Self { template, exemplars: Vec::new(), chat: None, chat_options: RenderOptions::default() }
    }

    /// Uses these exemplars (see [`sample_exemplars`]).
    pub fn with_exemplars(mut self, exemplars: Vec<Problem>) -> Self {
        self.exemplars = exemplars;
        self
    }

    /// Renders through a checkpoint's chat template, with extra template variables.
    pub fn with_chat_template(mut self, chat: ChatTemplate, extra: serde_json::Map<String, serde_json::Value>) -> Self {
        self.chat = Some(chat);
        self.chat_options = RenderOptions { add_generation_prompt: true, extra };
        self
    }

    /// Whether prompts are rendered through a chat template: such a prompt already holds the
    /// template's special tokens, so it is encoded without adding any (as TRL does).
    pub fn uses_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The template.
    pub fn template(&self) -> Template {
        self.template
    }

    /// The exemplars.
    pub fn exemplars(&self) -> &[Problem] {
        &self.exemplars
    }

    /// The conversation for `question`: the system prompt if any, one user and one assistant
    /// turn per exemplar, then the question.
    pub fn messages(&self, question: &str) -> Vec<Message> {
        let mut messages = Vec::with_capacity(2 * self.exemplars.len() + 2);
        if let Some(system) = self.template.system_prompt() {
            messages.push(Message::new(Role::System, system));
        }
        for exemplar in &self.exemplars {
            messages.push(Message::new(Role::User, self.template.user_turn(&exemplar.question)));
            messages.push(Message::new(Role::Assistant, self.template.response(exemplar)));
        }
        messages.push(Message::new(Role::User, self.template.user_turn(question)));
        messages
    }

    /// The prompt text for `question`: through the chat template when there is one, else as
    /// plain text (`Q: ...\nA: ...` blocks separated by blank lines, the system prompt first).
    pub fn render(&self, question: &str) -> Result<String, PromptError> {
        if let Some(chat) = &self.chat {
            return chat.render(&self.messages(question), &self.chat_options);
        }
        let mut text = String::new();
        if let Some(system) = self.template.system_prompt() {
            text.push_str(system.trim());
            text.push_str("\n\n");
        }
        for exemplar in &self.exemplars {
            text.push_str(&format!(
                "Q: {}\n{}{}\n\n",
                exemplar.question,
                self.template.response_prefix(),
                self.target(exemplar)
            ));
        }
        text.push_str(&format!("Q: {question}\n{}", self.template.response_prefix()));
        Ok(text)
    }

    /// What a perfect completion of `render(problem.question)` is: the supervised target.
    pub fn target(&self, problem: &Problem) -> String {
        let response = self.template.response(problem);
        if self.chat.is_some() {
            return response;
        }
        // In plain text the prompt already ends with the response prefix.
        let prefix = self.template.response_prefix();
        match response.strip_prefix(prefix) {
            Some(rest) => rest.to_string(),
            None => response,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasks::synthetic::{SyntheticConfig, generate};

    fn task() -> tasks::TaskData {
        generate(&SyntheticConfig { train_size: 200, test_size: 50, seed: 1, ..SyntheticConfig::default() }).unwrap()
    }

    #[test]
    fn exemplars_never_come_from_test() {
        let data = task();
        let error = sample_exemplars(&data.test, 4, 0).unwrap_err();
        assert!(matches!(error, PromptError::ExemplarsNotFromTrain { split: Split::Test }), "{error}");
        let test_questions: std::collections::HashSet<_> = data.test.problems.iter().map(|p| &p.question).collect();
        for seed in 0..20 {
            for exemplar in sample_exemplars(&data.train, 8, seed).unwrap() {
                assert!(data.train.problems.contains(&exemplar));
                assert!(!test_questions.contains(&exemplar.question));
            }
        }
    }

    #[test]
    fn exemplars_are_seeded_distinct_and_k_may_be_zero() {
        let data = task();
        let first = sample_exemplars(&data.train, 8, 3).unwrap();
        assert_eq!(first, sample_exemplars(&data.train, 8, 3).unwrap());
        assert_ne!(first, sample_exemplars(&data.train, 8, 4).unwrap());
        let ids: std::collections::HashSet<_> = first.iter().map(|p| &p.id).collect();
        assert_eq!(ids.len(), 8);
        assert!(sample_exemplars(&data.train, 0, 3).unwrap().is_empty());
        assert!(matches!(sample_exemplars(&data.train, 201, 3), Err(PromptError::TooManyExemplars { .. })));
    }

    #[test]
    fn zero_shot_plain_prompt() {
        let builder = PromptBuilder::new(Template::Plain);
        assert_eq!(builder.render("What is 1 + 1?").unwrap(), "Q: What is 1 + 1?\nA: Let's break it down.\n");
    }
}
