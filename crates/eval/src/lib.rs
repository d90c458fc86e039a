//! Scoring for cotlab: answer extraction, per-problem strict and lenient scores, accuracy with
//! Wilson confidence intervals, pass@k and maj@k, and the across-run statistics the study
//! reports (mean and spread over seeds, steps to convergence, variance of per-step quantities).
//!
//! Architecture invariant: this crate does no tensor work and no I/O; it scores text.

pub mod extract;
pub mod score;
pub mod stats;

pub use extract::AnswerFormat;
pub use score::{Accuracy, AccuracySummary, ProblemScore, parse_gold, score_completion};
