//! The study runner: study files, the comparison matrix, and (to come) running it.

pub mod config;
pub mod run;
