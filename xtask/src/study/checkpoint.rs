//! Checkpoints inside an RL cell (`cells/<id>/checkpoint/`), so that a rerun of an interrupted
//! cell continues from its last checkpoint and ends with the results of an uninterrupted run, and
//! the Ctrl-C handler that stops a cell at the end of a step with a checkpoint.
//!
//! A checkpoint is the algorithm's own ([`rl_algos::RlAlgorithm::save_checkpoint`]: the policy,
//! the optimizer state, `state.json`) plus the runner's state ([`RunnerState`], `runner.json`).
//! It is written whole into `checkpoint.tmp/`, then moved over `checkpoint/` by renames, so a
//! process killed at any point leaves one complete checkpoint or none ([`recover`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::study::evaluate::Sample;

/// The checkpoint of a cell, under its directory.
pub(crate) const CHECKPOINT_DIR: &str = "checkpoint";
/// The checkpoint being written (never read: it may be incomplete).
const WRITING_DIR: &str = "checkpoint.tmp";
/// The previous checkpoint while the new one takes its place.
const PREVIOUS_DIR: &str = "checkpoint.old";
/// The runner's part of a checkpoint.
const RUNNER_FILE: &str = "runner.json";

/// What the study runner needs, beyond the algorithm's checkpoint, to continue a cell as if it
/// had not stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunnerState {
    /// Training steps completed.
    pub(crate) step: u64,
    /// The method as the study file had it when the checkpoint was written: a checkpoint of
    /// other settings is not resumed.
    pub(crate) method: serde_json::Value,
    /// The position of the prompt generator (`ChaCha8Rng::get_word_pos`; a string, since JSON
    /// numbers do not hold a u128).
    pub(crate) prompt_rng_word_pos: String,
    /// Training seconds so far (evaluation excluded).
    pub(crate) train_seconds: f64,
    /// Seconds of held-out evaluation during training so far.
    pub(crate) eval_seconds: f64,
    /// The metrics.csv rows so far, every value as Rust writes an f64 (it reads it back
    /// bit for bit, NaN and infinities included, which JSON numbers do not hold).
    pub(crate) metrics: Vec<BTreeMap<String, String>>,
    /// What the policy wrote before training (samples.jsonl's `before` stage).
    pub(crate) samples_before: Vec<Sample>,
}

impl RunnerState {
    /// The state of a cell `step` steps in.
    pub(crate) fn new(
        step: u64,
        method: serde_json::Value,
        rng: &ChaCha8Rng,
        train_seconds: f64,
        eval_seconds: f64,
        metrics: &[rl_algos::Metrics],
        samples_before: &[Sample],
    ) -> Self {
        let metrics = metrics
            .iter()
            .map(|row| row.iter().map(|(key, value)| (key.clone(), value.to_string())).collect())
            .collect();
        Self {
            step,
            method,
            prompt_rng_word_pos: rng.get_word_pos().to_string(),
            train_seconds,
            eval_seconds,
            metrics,
            samples_before: samples_before.to_vec(),
        }
    }

    /// Reads `runner.json` of the checkpoint `dir`.
    pub(crate) fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(RUNNER_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a checkpoint's runner state", path.display()))
    }

    /// The metrics rows, as they were.
    pub(crate) fn metrics_rows(&self) -> anyhow::Result<Vec<rl_algos::Metrics>> {
        self.metrics
            .iter()
            .map(|row| {
                row.iter()
                    .map(|(key, value)| {
                        Ok((
                            key.clone(),
                            value
                                .parse::<f64>()
                                .with_context(|| format!("metric {key} = {value:?} is not a number"))?,
                        ))
                    })
                    .collect()
            })
            .collect()
    }

    /// Moves `rng` (seeded as at the start of the cell) to where it was.
    pub(crate) fn restore_rng(&self, rng: &mut ChaCha8Rng) -> anyhow::Result<()> {
        let position = self
            .prompt_rng_word_pos
            .parse::<u128>()
            .with_context(|| format!("prompt_rng_word_pos = {:?} is not a position", self.prompt_rng_word_pos))?;
        rng.set_word_pos(position);
        Ok(())
    }
}

/// Writes a checkpoint of `algorithm` and `state` as `cell_dir/checkpoint/`, replacing the one
/// there: whole into `checkpoint.tmp/`, then renamed into place, the old one renamed aside first
/// and removed last.
pub(crate) fn write(cell_dir: &Path, algorithm: &dyn rl_algos::RlAlgorithm, state: &RunnerState) -> anyhow::Result<()> {
    let writing = cell_dir.join(WRITING_DIR);
    remove_dir(&writing)?;
    std::fs::create_dir_all(&writing).with_context(|| format!("cannot create {}", writing.display()))?;
    algorithm
        .save_checkpoint(&writing)
        .with_context(|| format!("cannot write the checkpoint {}", writing.display()))?;
    let runner = writing.join(RUNNER_FILE);
    std::fs::write(&runner, serde_json::to_string_pretty(state)?)
        .with_context(|| format!("cannot write {}", runner.display()))?;
    let (current, previous) = (cell_dir.join(CHECKPOINT_DIR), cell_dir.join(PREVIOUS_DIR));
    if current.is_dir() {
        // A leftover of an earlier swap is older than `current`.
        remove_dir(&previous)?;
        std::fs::rename(&current, &previous)
            .with_context(|| format!("cannot move {} to {}", current.display(), previous.display()))?;
    }
    std::fs::rename(&writing, &current)
        .with_context(|| format!("cannot move {} to {}", writing.display(), current.display()))?;
    remove_dir(&previous)
}

/// The complete checkpoint of `cell_dir`, if it has one: `checkpoint/`, or, when a swap was cut
/// between its two renames, `checkpoint.old/` put back in its place. A `checkpoint.tmp/` is
/// removed: nothing says it was finished.
pub(crate) fn recover(cell_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let (current, previous) = (cell_dir.join(CHECKPOINT_DIR), cell_dir.join(PREVIOUS_DIR));
    remove_dir(&cell_dir.join(WRITING_DIR))?;
    if !current.is_dir() && previous.is_dir() {
        std::fs::rename(&previous, &current)
            .with_context(|| format!("cannot move {} back to {}", previous.display(), current.display()))?;
    }
    remove_dir(&previous)?;
    Ok(current.join(RUNNER_FILE).is_file().then_some(current))
}

/// Removes every checkpoint of `cell_dir` (a cell that finished, diverged or starts over).
pub(crate) fn remove(cell_dir: &Path) -> anyhow::Result<()> {
    for name in [CHECKPOINT_DIR, PREVIOUS_DIR, WRITING_DIR] {
        remove_dir(&cell_dir.join(name))?;
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A cell stopped by Ctrl-C after writing a checkpoint; `compare` exits with this error and
/// writes no result for the cell.
#[derive(Debug)]
pub(crate) struct Interrupted {
    /// Steps completed (and checkpointed).
    pub(crate) step: u64,
    /// The cell's id.
    pub(crate) cell: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted at step {} of {}; rerun the same command to resume", self.step, self.cell)
    }
}

impl std::error::Error for Interrupted {}

static INTERRUPT_REQUESTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_interrupt(_signal: libc::c_int) {
    // Only async-signal-safe calls here: an atomic, write(2), signal(2), raise(3).
    if INTERRUPT_REQUESTED.swap(true, Ordering::SeqCst) {
        // The second Ctrl-C: the default action, now.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::raise(libc::SIGINT);
        }
        return;
    }
    let message = b"\nCtrl-C: stopping after this step to write a checkpoint (Ctrl-C again quits now)\n";
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
    }
}

/// While alive, Ctrl-C (SIGINT) does not kill the process but asks the training loop to stop at
/// the end of its step ([`Self::requested`]); a second Ctrl-C kills it. Outside a training loop
/// Ctrl-C keeps its default action: there is no step to finish. A process started with SIGINT
/// ignored (`nohup`, a background job of a script) keeps ignoring it.
pub(crate) struct InterruptGuard {
    #[cfg(unix)]
    previous: libc::sighandler_t,
}

impl InterruptGuard {
    /// Installs the handler.
    pub(crate) fn install() -> Self {
        INTERRUPT_REQUESTED.store(false, Ordering::SeqCst);
        #[cfg(unix)]
        {
            let handler = on_interrupt as extern "C" fn(libc::c_int);
            let previous = unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
            if previous == libc::SIG_IGN {
                unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
            }
            Self { previous }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Whether Ctrl-C was pressed since [`Self::install`].
    pub(crate) fn requested(&self) -> bool {
        INTERRUPT_REQUESTED.load(Ordering::SeqCst)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        unsafe {
            libc::signal(libc::SIGINT, self.previous);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The runner's state reads back bit for bit: NaN and infinite metrics, the prompt
    /// generator's position, the samples.
    #[test]
    fn runner_state_round_trips_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..5 {
            rng.random_range(0..1000u32);
        }
        let row: rl_algos::Metrics =
            [("step", 3.0), ("loss", 0.1 + 0.2), ("reward", f64::NAN), ("kl", f64::NEG_INFINITY), ("tiny", 5e-324)]
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect();
        let sample = Sample {
            question: "1+1".into(),
            answer: "2".into(),
            completion: "#### 2".into(),
            strict: true,
            lenient: true,
        };
        let state = RunnerState::new(
            3,
            serde_json::json!({"kind": "rl"}),
            &rng,
            1.5,
            0.5,
            std::slice::from_ref(&row),
            &[sample],
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RUNNER_FILE), serde_json::to_string(&state).unwrap()).unwrap();
        let read = RunnerState::read(dir.path()).unwrap();
        let rows = read.metrics_rows().unwrap();
        assert_eq!(rows[0].keys().collect::<Vec<_>>(), row.keys().collect::<Vec<_>>());
        for (key, value) in &row {
            assert_eq!(rows[0][key].to_bits(), value.to_bits(), "{key}");
        }
        let mut restored = ChaCha8Rng::seed_from_u64(7);
        read.restore_rng(&mut restored).unwrap();
        assert_eq!(restored.random::<u64>(), rng.random::<u64>(), "the prompt generator continues where it was");
        assert_eq!((read.step, read.samples_before[0].completion.as_str()), (3, "#### 2"));
    }

    /// A swap cut between its renames leaves the previous checkpoint, which [`recover`] puts
    /// back; a half-written `checkpoint.tmp` is never used.
    #[test]
    fn recover_finds_the_complete_checkpoint() {
        let cell = tempfile::tempdir().unwrap();
        let complete = |name: &str, step: &str| {
            std::fs::create_dir_all(cell.path().join(name)).unwrap();
            std::fs::write(cell.path().join(name).join(RUNNER_FILE), step).unwrap();
        };
        assert_eq!(recover(cell.path()).unwrap(), None);
        // Killed while writing the first checkpoint.
        std::fs::create_dir_all(cell.path().join(WRITING_DIR)).unwrap();
        assert_eq!(recover(cell.path()).unwrap(), None);
        assert!(!cell.path().join(WRITING_DIR).exists());
        // Killed after moving the old one aside, before moving the new one in.
        complete(PREVIOUS_DIR, "2");
        complete(WRITING_DIR, "4");
        let found = recover(cell.path()).unwrap().unwrap();
        assert_eq!(
            (
                found.file_name().unwrap().to_str().unwrap(),
                std::fs::read_to_string(found.join(RUNNER_FILE)).unwrap().as_str()
            ),
            (CHECKPOINT_DIR, "2")
        );
        assert!(!cell.path().join(PREVIOUS_DIR).exists() && !cell.path().join(WRITING_DIR).exists());
        // Killed after the new one moved in, before the old one was removed.
        complete(PREVIOUS_DIR, "2");
        std::fs::write(cell.path().join(CHECKPOINT_DIR).join(RUNNER_FILE), "4").unwrap();
        let found = recover(cell.path()).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(found.join(RUNNER_FILE)).unwrap(), "4");
        assert!(!cell.path().join(PREVIOUS_DIR).exists());
        remove(cell.path()).unwrap();
        assert_eq!(recover(cell.path()).unwrap(), None);
    }
}
