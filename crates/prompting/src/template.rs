//! Prompt templates: how a question is posed and how a worked solution is written.

use eval::AnswerFormat;
use serde::{Deserialize, Serialize};
use tasks::Problem;

/// The TRL GRPO demo's system prompt, verbatim (leading and trailing newline included).
pub const XML_REASONING_SYSTEM_PROMPT: &str =
    "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n";

/// The DeepSeek-R1-style system prompt that Minimal-GRPO trains with.
pub const THINK_ANSWER_SYSTEM_PROMPT: &str = "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>";

/// The cue that opens every answer of the [`Template::Plain`] format (the GPT-Neo study's).
pub const PLAIN_ANSWER_CUE: &str = "A: Let's break it down.";

/// How a question is posed and a solution written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// The GPT-Neo study's plain text: `Q: <question>\nA: Let's break it down.\n<solution>\n#### N`.
    /// For base (non-chat) models; strict scoring reads GSM8K's `#### N`.
    Plain,
    /// The TRL GRPO demo: a system prompt asking for `<reasoning>...</reasoning>` then
    /// `<answer>...</answer>`, each tag on its own line.
    XmlReasoning,
    /// Minimal-GRPO: `<think>...</think>` then `<answer>...</answer>`.
    ThinkAnswer,
}

impl Template {
    /// Every template.
    pub const ALL: [Template; 3] = [Template::Plain, Template::XmlReasoning, Template::ThinkAnswer];

    /// The answer format strict scoring reads for this template.
    pub fn answer_format(self) -> AnswerFormat {
        match self {
            Template::Plain => AnswerFormat::Gsm8kMarker,
            Template::XmlReasoning | Template::ThinkAnswer => AnswerFormat::AnswerTag,
        }
    }

    /// The system prompt, when the template has one.
    pub fn system_prompt(self) -> Option<&'static str> {
        match self {
            Template::Plain => None,
            Template::XmlReasoning => Some(XML_REASONING_SYSTEM_PROMPT),
            Template::ThinkAnswer => Some(THINK_ANSWER_SYSTEM_PROMPT),
        }
    }

    /// The user turn that poses `question` (chat form).
    pub fn user_turn(self, question: &str) -> String {
        match self {
            Template::Plain => format!("Q: {question}"),
            Template::XmlReasoning | Template::ThinkAnswer => question.to_string(),
        }
    }

    /// The assistant turn that answers `problem` with its worked solution: what a perfect
    /// completion looks like, used for few-shot exemplars and supervised training targets.
    pub fn response(self, problem: &Problem) -> String {
        let Problem { solution, answer, .. } = problem;
        match self {
            Template::Plain => format!("{PLAIN_ANSWER_CUE}\n{solution}\n#### {answer}"),
            Template::XmlReasoning => {
                format!("<reasoning>\n{solution}\n</reasoning>\n<answer>\n{answer}\n</answer>\n")
            }
            Template::ThinkAnswer => format!("<think>\n{solution}\n</think>\n<answer>{answer}</answer>"),
        }
    }

    /// Text the model is given to start its answer with in plain-text prompts, so that it
    /// continues in the template's format (`A: Let's break it down.\n` for [`Template::Plain`]).
    pub fn response_prefix(self) -> &'static str {
        match self {
            Template::Plain => "A: Let's break it down.\n",
            Template::XmlReasoning | Template::ThinkAnswer => "A: ",
        }
    }

    /// Strings at which generation stops (beside the end-of-sequence token), so that a base
    /// model does not go on to write the next few-shot question.
    pub fn stop_sequences(self) -> &'static [&'static str] {
        match self {
            Template::Plain => &["\n\nQ:", "\nQ:"],
            Template::XmlReasoning | Template::ThinkAnswer => &["</answer>", "\n\nQ:"],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        Problem {
            id: "p".into(),
            question: "What is 2 + 3 * 4?".into(),
            solution: "3 * 4 = 12\n2 + 12 = 14".into(),
            answer: "14".into(),
        }
    }

    #[test]
    fn responses_are_scored_correct_by_their_own_strict_format() {
        for template in Template::ALL {
            let response = template.response(&problem());
            let score = eval::score_completion(&response, "14", template.answer_format());
            assert!(score.strict && score.lenient, "{template:?}: {response:?}");
        }
    }

    #[test]
    fn xml_response_matches_the_trl_strict_format() {
        let response = Template::XmlReasoning.response(&problem());
        assert_eq!(response, "<reasoning>\n3 * 4 = 12\n2 + 12 = 14\n</reasoning>\n<answer>\n14\n</answer>\n");
        assert_eq!(Template::Plain.response(&problem()), "A: Let's break it down.\n3 * 4 = 12\n2 + 12 = 14\n#### 14");
    }
}
