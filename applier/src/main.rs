//! `bdr-applier`: one per node; streams committed changes from every peer
//! and applies them locally.

use clap::Parser;

/// Streams changes from every peer of this node and applies them.
#[derive(Debug, Parser)]
#[command(name = "bdr-applier", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
