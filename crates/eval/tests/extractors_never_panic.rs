//! Property tests: no extractor or scorer panics on arbitrary input.

use eval::{AnswerFormat, extract, parse_gold, score_completion};
use proptest::prelude::*;

/// Text biased towards the characters the extractors look for.
fn answer_like_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("#### ".to_string()),
            Just("<answer>".to_string()),
            Just("</answer>".to_string()),
            Just("$".to_string()),
            Just(",".to_string()),
            Just(".".to_string()),
            Just("-".to_string()),
            "[0-9]{1,4}",
            "\\PC{0,3}",
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #[test]
    fn extractors_never_panic_on_any_string(text in "\\PC*") {
        let _ = extract::gsm8k_official(&text);
        let _ = extract::answer_tag(&text);
        let _ = extract::last_number(&text);
        let _ = parse_gold(&text);
        for format in [AnswerFormat::Gsm8kMarker, AnswerFormat::AnswerTag] {
            let _ = score_completion(&text, "42", format);
        }
    }

    #[test]
    fn extractors_never_panic_on_answer_like_text(text in answer_like_text()) {
        for format in [AnswerFormat::Gsm8kMarker, AnswerFormat::AnswerTag] {
            let score = score_completion(&text, "-1200", format);
            // Whatever was extracted is normalised and numeric when lenient succeeds.
            if score.lenient {
                let normalised = score.lenient_answer.as_deref().and_then(tasks::normalize_number);
                prop_assert_eq!(normalised.as_deref(), Some("-1200"));
            }
        }
        if let Some(number) = extract::last_number(&text) {
            prop_assert!(tasks::normalize_number(&number).is_some(), "{number}");
        }
    }

    #[test]
    fn a_written_number_is_read_back(value in -1_000_000i64..1_000_000, padding in "[a-z ]{0,10}") {
        let completion = format!("{padding} so the total is {value}.");
        prop_assert_eq!(extract::last_number(&completion), Some(value.to_string()));
        let marked = format!("{padding}\n#### {value}");
        prop_assert_eq!(extract::gsm8k_official(&marked), Some(value.to_string()));
    }
}
