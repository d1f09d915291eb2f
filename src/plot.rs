//! `hindsight plot RUN_DIR... --output FIG.png|FIG.svg`: learning curves of one or more runs
//! on one figure, so that arms (HiR, binary, CLA) can be compared at a glance.
//!
//! Every run directory contributes its `steps.jsonl` (training success rate, mean reward,
//! replays per batch) and, when present, its `eval.jsonl` (benchmark scores of the versions
//! the evaluator scored). Each quantity is drawn twice: against the learner step and against
//! the cumulative **generated responses** (`generated_responses` in `steps.jsonl`), the x-axis
//! that shows sample efficiency: a HiR step costs `m` responses per prompt, a baseline step
//! `n`. Reading the files is [`data`]; drawing is [`figure`] (plotters, with an embedded
//! DejaVu Sans for the PNG text so that nothing depends on the machine's fonts).

mod data;
mod figure;

use std::path::PathBuf;

use anyhow::Result;

pub use data::{read_run, Run};

/// `hindsight plot` (an offline tool: flags only, no environment variables).
#[derive(clap::Args, Debug, Clone)]
pub struct PlotArgs {
    /// Run directories (as written by `hindsight up`: `steps.jsonl`, optionally
    /// `summary.json` and `eval.jsonl`).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The figure to write: `.png` or `.svg`.
    #[arg(long, short)]
    pub output: PathBuf,
}

/// Reads every run and writes the figure; bad input is a configuration error (exit 2).
pub fn run(args: PlotArgs) -> Result<()> {
    let runs = args
        .runs
        .iter()
        .map(|dir| read_run(dir))
        .collect::<Result<Vec<_>>>()
        .map_err(hindsight_service::ConfigError::wrap)?;
    write(&runs, &args.output)?;
    println!("wrote {}", args.output.display());
    Ok(())
}

/// Draws `runs` into `output` (`.png` or `.svg`, by extension).
pub fn write(runs: &[Run], output: &std::path::Path) -> Result<()> {
    let format = figure::Format::from_path(output).map_err(hindsight_service::ConfigError::wrap)?;
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    figure::draw(runs, output, format)
}
