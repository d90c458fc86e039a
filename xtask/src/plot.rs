//! `cargo xtask plot [reports/<study>]`: renders a study's charts. The charts come with the
//! study runner; until it lands this entry point parses its arguments and says so.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The study's report directory; the newest under `reports/` when none is named.
    report: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let report = args.report.unwrap_or_else(|| PathBuf::from("reports"));
    anyhow::bail!(
        "`plot` cannot render {} yet: there are no study reports to plot until `compare` runs",
        report.display()
    )
}
