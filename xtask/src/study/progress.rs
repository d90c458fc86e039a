//! Progress bars and log lines (plain lines with `--quiet`).

use indicatif::MultiProgress;

pub(crate) fn log(quiet: bool, progress: &MultiProgress, message: String) {
    if quiet {
        eprintln!("{message}");
    } else {
        let _ = progress.println(message);
    }
}
