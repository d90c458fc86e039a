//! Synthetic arithmetic, in the spirit of the Minimal-GRPO seed: random expressions over `+`,
//! `-`, `*` and parentheses, each with a worked solution of one line per operation (innermost
//! first, left to right) and the integer answer.
//!
//! ```text
//! question: What is (3 + 4) * 5 - 2?
//! solution: 3 + 4 = 7
//!           7 * 5 = 35
//!           35 - 2 = 33
//! answer:   33
//! ```
//!
//! Generation is deterministic for a seed (ChaCha8, whose stream is stable across `rand`
//! versions). Test problems are drawn first and train problems are drawn until they are distinct
//! from every test problem, so no test question ever appears in train.

use std::collections::HashSet;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Problem, Split, SplitProblems, TaskData, TaskError};

/// An arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operator {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
}

impl Operator {
    fn symbol(self) -> &'static str {
        match self {
            Operator::Add => "+",
            Operator::Sub => "-",
            Operator::Mul => "*",
        }
    }

    fn precedence(self) -> u8 {
        match self {
            Operator::Add | Operator::Sub => 1,
            Operator::Mul => 2,
        }
    }

    fn apply(self, left: i64, right: i64) -> i64 {
        match self {
            Operator::Add => left + right,
            Operator::Sub => left - right,
            Operator::Mul => left * right,
        }
    }
}

/// How synthetic problems are drawn. Every field has a default, so a study file may name only
/// what it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Smallest operand (inclusive, at least 0). Default 1: zero makes many products trivial.
    pub min_operand: i64,
    /// Largest operand (inclusive). Default 20: products stay within three digits, which a tiny
    /// model can learn to compute digit by digit.
    pub max_operand: i64,
    /// Fewest operations per expression (at least 1). Default 1.
    pub min_operations: usize,
    /// Most operations per expression. Default 3: enough for a chain of thought to help.
    pub max_operations: usize,
    /// Deepest nesting of the expression tree (operations on the longest root-to-leaf path).
    /// Default 2; must allow `max_operations` (at most 2^depth - 1 operations fit).
    pub max_depth: usize,
    /// The operators drawn from, uniformly. Default all three.
    pub operators: Vec<Operator>,
    /// Number of train problems. Default 5000.
    pub train_size: usize,
    /// Number of test problems. Default 500: a 95% CI of about ±4 points at 50% accuracy.
    pub test_size: usize,
    /// Seed of the generator; the same seed gives the same problems.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            min_operand: 1,
            max_operand: 20,
            min_operations: 1,
            max_operations: 3,
            max_depth: 2,
            operators: vec![Operator::Add, Operator::Sub, Operator::Mul],
            train_size: 5000,
            test_size: 500,
            seed: 0,
        }
    }
}

impl SyntheticConfig {
    /// Checks the fields against each other; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), TaskError> {
        let bad = |field, message: String| Err(TaskError::BadSyntheticConfig { field, message });
        if self.min_operand < 0 {
            return bad("min_operand", format!("{} is negative; use 0 or more", self.min_operand));
        }
        if self.max_operand < self.min_operand {
            return bad("max_operand", format!("{} is below min_operand = {}", self.max_operand, self.min_operand));
        }
        if self.max_operand > 1_000_000 {
            return bad("max_operand", format!("{} is too large; use at most 1000000", self.max_operand));
        }
        if self.min_operations == 0 {
            return bad("min_operations", "must be at least 1".to_string());
        }
        if self.max_operations < self.min_operations {
            return bad(
                "max_operations",
                format!("{} is below min_operations = {}", self.max_operations, self.min_operations),
            );
        }
        if self.max_depth == 0 || self.max_depth > 16 {
            return bad("max_depth", format!("{} is out of range; use 1 to 16", self.max_depth));
        }
        let fit = (1usize << self.max_depth) - 1;
        if self.max_operations > fit {
            return bad(
                "max_depth",
                format!(
                    "a depth of {} holds at most {fit} operations but max_operations = {}; raise \
                     max_depth or lower max_operations",
                    self.max_depth, self.max_operations
                ),
            );
        }
        if self.operators.is_empty() {
            return bad("operators", "is empty; name at least one of \"add\", \"sub\", \"mul\"".to_string());
        }
        if self.test_size == 0 || self.train_size == 0 {
            return bad("train_size", "train_size and test_size must both be at least 1".to_string());
        }
        Ok(())
    }
}

/// An arithmetic expression tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expression {
    /// A non-negative integer literal.
    Number(i64),
    /// `left op right`.
    Operation { op: Operator, left: Box<Expression>, right: Box<Expression> },
}

impl Expression {
    /// The value of the expression.
    pub fn evaluate(&self) -> i64 {
        match self {
            Expression::Number(value) => *value,
            Expression::Operation { op, left, right } => op.apply(left.evaluate(), right.evaluate()),
        }
    }

    /// One line per operation, innermost first and left to right (`3 + 4 = 7`), ending with the
    /// operation that gives the answer.
    pub fn worked_solution(&self) -> Vec<String> {
        let mut lines = Vec::new();
        self.collect_steps(&mut lines);
        lines
    }

    fn collect_steps(&self, lines: &mut Vec<String>) -> i64 {
        match self {
            Expression::Number(value) => *value,
            Expression::Operation { op, left, right } => {
                let left_value = left.collect_steps(lines);
                let right_value = right.collect_steps(lines);
                let value = op.apply(left_value, right_value);
                lines.push(format!("{left_value} {} {right_value} = {value}", op.symbol()));
                value
            }
        }
    }

    fn precedence(&self) -> u8 {
        match self {
            Expression::Number(_) => u8::MAX,
            Expression::Operation { op, .. } => op.precedence(),
        }
    }
}

impl fmt::Display for Expression {
    /// Writes the expression with the parentheses its tree needs and no others, except that a
    /// right operand of equal precedence keeps its parentheses (`8 - (3 + 2)`, and also
    /// `8 + (3 - 2)`), so the text is read in exactly the order the worked solution computes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expression::Number(value) => write!(f, "{value}"),
            Expression::Operation { op, left, right } => {
                if left.precedence() < op.precedence() {
                    write!(f, "({left})")?;
                } else {
                    write!(f, "{left}")?;
                }
                write!(f, " {} ", op.symbol())?;
                if right.precedence() <= op.precedence() { write!(f, "({right})") } else { write!(f, "{right}") }
            }
        }
    }
}

/// Draws a random expression with exactly `operations` operations and a depth of at most
/// `depth`.
fn random_expression(rng: &mut ChaCha8Rng, config: &SyntheticConfig, operations: usize, depth: usize) -> Expression {
    if operations == 0 {
        return Expression::Number(rng.random_range(config.min_operand..=config.max_operand));
    }
    // Each side of the root must fit in a tree of depth - 1, which holds 2^(depth-1) - 1 operations.
    let side_capacity = (1usize << (depth - 1)) - 1;
    let remaining = operations - 1;
    let lowest_left = remaining.saturating_sub(side_capacity);
    let highest_left = remaining.min(side_capacity);
    let left_operations = rng.random_range(lowest_left..=highest_left);
    let op = config.operators[rng.random_range(0..config.operators.len())];
    let left = random_expression(rng, config, left_operations, depth - 1);
    let right = random_expression(rng, config, remaining - left_operations, depth - 1);
    Expression::Operation { op, left: Box::new(left), right: Box::new(right) }
}

fn problem_from_expression(expression: &Expression, split: Split, index: usize) -> Problem {
    Problem {
        id: format!("synthetic-{split}-{index}"),
        question: format!("What is {expression}?"),
        solution: expression.worked_solution().join("\n"),
        answer: expression.evaluate().to_string(),
    }
}

/// Generates both splits. Deterministic for `config` (seed included); test questions never
/// appear in train.
pub fn generate(config: &SyntheticConfig) -> Result<TaskData, TaskError> {
    config.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut seen = HashSet::new();
    let wanted = config.train_size + config.test_size;
    // Small operand ranges may not hold enough distinct expressions: give up after a bounded
    // number of draws rather than loop for ever.
    let max_draws = wanted.saturating_mul(50).max(10_000);
    let mut splits = Vec::with_capacity(2);
    for (split, size) in [(Split::Test, config.test_size), (Split::Train, config.train_size)] {
        let mut problems = Vec::with_capacity(size);
        let mut draws = 0;
        while problems.len() < size {
            draws += 1;
            if draws > max_draws {
                return Err(TaskError::TooFewDistinctProblems { wanted, generated: seen.len() });
            }
            let operations = rng.random_range(config.min_operations..=config.max_operations);
            let expression = random_expression(&mut rng, config, operations, config.max_depth);
            let problem = problem_from_expression(&expression, split, problems.len());
            if seen.insert(problem.question.clone()) {
                problems.push(problem);
            }
        }
        splits.push(SplitProblems::new(split, problems, "synthetic arithmetic")?);
    }
    let train = splits.pop().expect("train generated");
    let test = splits.pop().expect("test generated");
    Ok(TaskData { name: "synthetic-arithmetic".to_string(), train, test })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_config(seed: u64) -> SyntheticConfig {
        SyntheticConfig { train_size: 300, test_size: 100, seed, ..SyntheticConfig::default() }
    }

    #[test]
    fn same_seed_same_problems_other_seed_other_problems() {
        let first = generate(&small_config(7)).unwrap();
        let again = generate(&small_config(7)).unwrap();
        let other = generate(&small_config(8)).unwrap();
        assert_eq!(first, again);
        assert_ne!(first.test.problems, other.test.problems);
    }

    #[test]
    fn test_questions_never_appear_in_train() {
        for seed in 0..5 {
            let data = generate(&small_config(seed)).unwrap();
            let test: HashSet<_> = data.test.problems.iter().map(|p| &p.question).collect();
            assert_eq!(test.len(), 100, "test questions are distinct");
            assert!(data.train.problems.iter().all(|p| !test.contains(&p.question)));
            assert_eq!(data.train.len(), 300);
        }
    }

    #[test]
    fn worked_solution_follows_the_displayed_expression() {
        // (3 + 4) * 5 - 2
        let expression = Expression::Operation {
            op: Operator::Sub,
            left: Box::new(Expression::Operation {
                op: Operator::Mul,
                left: Box::new(Expression::Operation {
                    op: Operator::Add,
                    left: Box::new(Expression::Number(3)),
                    right: Box::new(Expression::Number(4)),
                }),
                right: Box::new(Expression::Number(5)),
            }),
            right: Box::new(Expression::Number(2)),
        };
        assert_eq!(expression.to_string(), "(3 + 4) * 5 - 2");
        assert_eq!(expression.worked_solution(), ["3 + 4 = 7", "7 * 5 = 35", "35 - 2 = 33"]);
        assert_eq!(expression.evaluate(), 33);
        let right_nested = Expression::Operation {
            op: Operator::Sub,
            left: Box::new(Expression::Number(8)),
            right: Box::new(Expression::Operation {
                op: Operator::Sub,
                left: Box::new(Expression::Number(3)),
                right: Box::new(Expression::Number(9)),
            }),
        };
        assert_eq!(right_nested.to_string(), "8 - (3 - 9)");
        assert_eq!(right_nested.worked_solution(), ["3 - 9 = -6", "8 - -6 = 14"]);
    }

    #[test]
    fn generated_problems_respect_the_config() {
        let config = SyntheticConfig { min_operations: 2, max_operations: 3, ..small_config(3) };
        let data = generate(&config).unwrap();
        for problem in data.train.problems.iter().chain(&data.test.problems) {
            let steps = problem.solution.lines().count();
            assert!((2..=3).contains(&steps), "{problem:?}");
            let last = problem.solution.lines().last().unwrap();
            assert!(last.ends_with(&format!("= {}", problem.answer)), "{problem:?}");
            assert!(problem.question.starts_with("What is ") && problem.question.ends_with('?'));
        }
    }

    #[test]
    fn impossible_configs_are_errors_naming_the_field() {
        let too_deep = SyntheticConfig { max_operations: 4, max_depth: 2, ..small_config(0) };
        assert!(too_deep.validate().unwrap_err().to_string().contains("max_depth"));
        let inverted = SyntheticConfig { min_operand: 5, max_operand: 2, ..small_config(0) };
        assert!(inverted.validate().unwrap_err().to_string().contains("max_operand"));
        let tiny = SyntheticConfig {
            min_operand: 1,
            max_operand: 2,
            max_operations: 1,
            max_depth: 1,
            operators: vec![Operator::Add],
            ..small_config(0)
        };
        assert!(matches!(generate(&tiny), Err(TaskError::TooFewDistinctProblems { .. })));
    }
}
