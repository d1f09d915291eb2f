//! `hindsight bench train` (work in progress).

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {}

/// Runs the benchmark.
pub fn run(_args: BenchTrainArgs) -> Result<()> {
    anyhow::bail!("bench train: not implemented yet")
}
