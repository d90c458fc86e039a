use policy_models::presets::train_tokenizer;
use prompting::Template;
use reward_model::comparisons::build_comparisons;
use tasks::synthetic::{SyntheticConfig, generate, Operator};
use std::io::Write;
fn main() {
    let task = generate(&SyntheticConfig { operators: vec![Operator::Add, Operator::Sub], min_operand: 1, max_operand: 9, min_operations: 1, max_operations: 2, max_depth: 2, train_size: 4000, test_size: 400, seed: 0 }).unwrap();
    let template = Template::Plain;
    let corpus: Vec<String> = task.train.problems.iter().map(|p| format!("{}\n{}", p.question, template.response(p))).collect();
    let tokenizer = train_tokenizer(corpus.into_iter(), 384).unwrap();
    tokenizer.save(std::path::Path::new("/tmp/rmp/tokenizer.json")).unwrap();
    for (name, pairs) in [("train", build_comparisons(&task.train, template, 2, 0)), ("test", build_comparisons(&task.test, template, 1, 1))] {
        let mut f = std::fs::File::create(format!("/tmp/rmp/{name}.jsonl")).unwrap();
        for p in pairs { writeln!(f, "{}", serde_json::to_string(&p).unwrap()).unwrap(); }
    }
}
