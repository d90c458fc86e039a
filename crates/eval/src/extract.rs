//! Final-answer extraction from model completions.
//!
//! Three extractors, from strict to lenient:
//! - [`gsm8k_official`]: the official GSM8K scorer's `#### (\-?[0-9\.\,]+)`, first match, commas
//!   removed, compared as a string (so `#### 72.` is not `72`, as in the official scorer);
//! - [`answer_tag`]: the text of the last `<answer>...</answer>`, trimmed, as the TRL GRPO demo
//!   extracts it (but `None` when there is no `<answer>` tag at all, where the demo would return
//!   the whole completion);
//! - [`last_number`]: the last number in the text, normalised (`$`, thousands separators, a
//!   trailing `.0`), so that `A: 26` and `The answer is $1,200.` both work.
//!
//! None of them panics on any input (property-tested).

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use tasks::normalize_number;

/// The answer format a prompt template asks for; it decides what *strict* scoring reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// GSM8K's final line `#### N`, read by the official scorer's regular expression.
    Gsm8kMarker,
    /// `<answer>N</answer>`, as in the TRL GRPO demo and Minimal-GRPO.
    AnswerTag,
}

static GSM8K_ANSWER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"#### (\-?[0-9\.\,]+)").expect("valid regex"));

/// A number as people write it: optional minus and dollar sign, digits with well-formed
/// thousands groups or none, optional decimals.
static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-?\$?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?").expect("valid regex"));

/// The official GSM8K extraction: the first `#### N`, commas removed.
pub fn gsm8k_official(text: &str) -> Option<String> {
    let captures = GSM8K_ANSWER.captures(text)?;
    Some(captures[1].trim().replace(',', ""))
}

/// The trimmed text between the last `<answer>` and the next `</answer>` (or the end of the
/// text when the closing tag is missing, as in the TRL demo). `None` without an `<answer>` tag.
pub fn answer_tag(text: &str) -> Option<String> {
    let (_, after) = text.rsplit_once("<answer>")?;
    let inside = after.split("</answer>").next().unwrap_or(after);
    Some(inside.trim().to_string())
}

/// The last number in the text, normalised with [`normalize_number`]. A `-` directly after a
/// letter, digit or closing bracket is a hyphen or a subtraction, not a sign (`5-3` ends in `3`).
pub fn last_number(text: &str) -> Option<String> {
    let found = NUMBER.find_iter(text).last()?;
    let mut number = found.as_str();
    if number.starts_with('-') {
        let before = text[..found.start()].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == ')' || c == ']') {
            number = &number[1..];
        }
    }
    normalize_number(number)
}

/// What strict scoring extracts for `format`.
pub fn strict(text: &str, format: AnswerFormat) -> Option<String> {
    match format {
        AnswerFormat::Gsm8kMarker => gsm8k_official(text),
        AnswerFormat::AnswerTag => answer_tag(text),
    }
}

/// What lenient scoring extracts: the last number inside the format's own answer region when
/// there is one (the `<answer>` tag, or the rest of the line after the first `####`), else the
/// last number anywhere.
/// So `<answer>36 dollars</answer>` gives `36`, and a completion that ends `A: 26` gives `26`.
pub fn lenient(text: &str, format: AnswerFormat) -> Option<String> {
    let region = match format {
        AnswerFormat::AnswerTag => answer_tag(text),
        // The line after the first `####`, the one the official scorer reads.
        AnswerFormat::Gsm8kMarker => {
            text.split_once("####").map(|(_, after)| after.lines().next().unwrap_or_default().to_string())
        }
    };
    region.as_deref().and_then(last_number).or_else(|| last_number(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_extraction_matches_the_reference_scorer() {
        assert_eq!(gsm8k_official("so 5 + 3 = 8\n#### 8").as_deref(), Some("8"));
        assert_eq!(gsm8k_official("#### -12").as_deref(), Some("-12"));
        assert_eq!(gsm8k_official("#### 850,000").as_deref(), Some("850000"));
        assert_eq!(gsm8k_official("#### 3.5").as_deref(), Some("3.5"));
        // The official scorer keeps a trailing period, so this is not "72".
        assert_eq!(gsm8k_official("#### 72.").as_deref(), Some("72."));
        // The first marker wins, as with re.search.
        assert_eq!(gsm8k_official("#### 1\n#### 2").as_deref(), Some("1"));
        assert_eq!(gsm8k_official("####72"), None);
        assert_eq!(gsm8k_official("The answer is 72"), None);
        assert_eq!(gsm8k_official("#### $5"), None);
    }

    #[test]
    fn answer_tag_reads_the_last_tag() {
        assert_eq!(answer_tag("<reasoning>\nx\n</reasoning>\n<answer>\n42\n</answer>\n").as_deref(), Some("42"));
        assert_eq!(answer_tag("<answer>1</answer> then <answer> -7 </answer>").as_deref(), Some("-7"));
        assert_eq!(answer_tag("<answer>13").as_deref(), Some("13"));
        assert_eq!(answer_tag("no tags, answer 13"), None);
        assert_eq!(answer_tag("<answer></answer>").as_deref(), Some(""));
    }

    #[test]
    fn last_number_handles_currency_commas_decimals_and_signs() {
        assert_eq!(last_number("A: 26").as_deref(), Some("26"));
        assert_eq!(last_number("The answer is $1,200.").as_deref(), Some("1200"));
        assert_eq!(last_number("It costs $18.00 in total").as_deref(), Some("18"));
        assert_eq!(last_number("temperature drops to -5 degrees").as_deref(), Some("-5"));
        assert_eq!(last_number("5-3").as_deref(), Some("3"));
        assert_eq!(last_number("(2)-3").as_deref(), Some("3"));
        assert_eq!(last_number("x = 2.5").as_deref(), Some("2.5"));
        assert_eq!(last_number("counts 1,2,3").as_deref(), Some("3"));
        assert_eq!(last_number("-$4").as_deref(), Some("-4"));
        assert_eq!(last_number("no digits here"), None);
        assert_eq!(last_number(""), None);
    }

    #[test]
    fn lenient_prefers_the_formats_answer_region() {
        assert_eq!(lenient("#### 72\n\nQ: what is 5?", AnswerFormat::Gsm8kMarker).as_deref(), Some("72"));
        assert_eq!(lenient("#### $1,000.", AnswerFormat::Gsm8kMarker).as_deref(), Some("1000"));
        assert_eq!(lenient("<answer>36 dollars</answer> and 5 more", AnswerFormat::AnswerTag).as_deref(), Some("36"));
        assert_eq!(lenient("<answer>none</answer> 7", AnswerFormat::AnswerTag).as_deref(), Some("7"));
        assert_eq!(lenient("so she makes $18\nA: 18", AnswerFormat::Gsm8kMarker).as_deref(), Some("18"));
        assert_eq!(lenient("nothing", AnswerFormat::AnswerTag), None);
    }
}
