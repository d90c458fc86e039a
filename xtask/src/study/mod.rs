//! The study runner: the study file and its matrix (`config`), and running it (`run`, which
//! drives the base, the reward model and the cells; `checkpoint`, `evaluate`, `prompts`,
//! `report` and `progress` serve them).

pub mod base;
pub mod cell;
pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod identity;
pub mod progress;
pub mod prompts;
pub mod provenance;
pub mod report;
pub mod reward_model;
pub mod run;
