//! `blockferry`: one binary, many subcommands.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use blockferry_agent::size::parse_size;
use blockferry_agent::volume::Volume;

#[derive(Debug, Parser)]
#[command(name = "blockferry", version, about = "Block-level disaster recovery for virtual disks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and inspect volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create a volume: a sparse raw image and its metadata in DIR.
    Create {
        #[arg(long)]
        dir: PathBuf,
        /// Size with an optional K/M/G/T suffix (binary), e.g. 10G.
        #[arg(long)]
        size: String,
        /// Tracking block size, a power of two from 4K to 1M.
        #[arg(long, default_value = "4K")]
        block_size: String,
        /// Export name (defaults to the directory's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Show a volume's metadata.
    Info {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Volume(VolumeCmd::Create { dir, size, block_size, name }) => {
            let size = parse_size(&size).context("--size")?;
            let block_size = parse_size(&block_size).context("--block-size")?;
            let v = Volume::create(&dir, size, block_size, name.as_deref())?;
            print!("created volume\n{}", v.describe());
        }
        Command::Volume(VolumeCmd::Info { dir, json }) => {
            let v = Volume::open(&dir)?;
            if json {
                let mut value = serde_json::to_value(&v.meta)?;
                value["image"] = v.image_path().display().to_string().into();
                value["allocated_bytes"] = v.allocated_bytes()?.into();
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", v.describe());
                println!("allocated:   {} bytes", v.allocated_bytes()?);
            }
        }
    }
    Ok(())
}
