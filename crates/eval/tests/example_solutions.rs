//! Agreement with the GSM8K authors' labels on real model solutions: for each of the four
//! models in `../shared/datasets/gsm8k/example_model_solutions.jsonl`, cotlab's lenient accuracy
//! is within 0.5 points of the share labelled `is_correct`.

use std::path::PathBuf;

use eval::{AccuracySummary, AnswerFormat, score_completion};
use tasks::Split;
use tasks::gsm8k::{self, Gsm8kOptions};

fn shared_gsm8k() -> PathBuf {
    let root = std::env::var_os("COTLAB_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    root.join("datasets/gsm8k")
}

#[test]
fn lenient_accuracy_agrees_with_the_labels_within_half_a_point() {
    let dir = shared_gsm8k();
    let gold = gsm8k::read_jsonl(&dir.join("test.jsonl"), Split::Test, Gsm8kOptions::default()).unwrap();
    let text = std::fs::read_to_string(dir.join("example_model_solutions.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(rows.len(), gold.len());
    for model in ["6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"] {
        let mut scores = Vec::new();
        let mut labelled_correct = 0usize;
        let mut disagreements = 0usize;
        for (row, problem) in rows.iter().zip(&gold.problems) {
            assert_eq!(row["question"].as_str().unwrap().trim(), problem.question, "same order as test.jsonl");
            let solution = row[model]["solution"].as_str().unwrap();
            let label = row[model]["is_correct"].as_bool().unwrap();
            let score = score_completion(solution, &problem.answer, AnswerFormat::Gsm8kMarker);
            labelled_correct += usize::from(label);
            disagreements += usize::from(label != score.lenient);
            scores.push(score);
        }
        let ours = AccuracySummary::from_scores(&scores).lenient.accuracy * 100.0;
        let labelled = labelled_correct as f64 / rows.len() as f64 * 100.0;
        println!("{model}: lenient {ours:.2}% vs labelled {labelled:.2}% ({disagreements} rows disagree)");
        assert!((ours - labelled).abs() <= 0.5, "{model}: lenient {ours:.2}% vs labelled {labelled:.2}%");
    }
}
