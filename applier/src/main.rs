//! `bdr-applier`: one per node; streams committed changes from every peer
//! and applies them locally.

use clap::Parser;

// The apply loop is the next user of the streaming client; until it lands,
// nothing in the binary calls it.
#[allow(dead_code, unused_imports)]
mod stream;

/// Streams changes from every peer of this node and applies them.
#[derive(Debug, Parser)]
#[command(name = "bdr-applier", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
