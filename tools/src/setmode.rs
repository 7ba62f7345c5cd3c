//! `blockferry volume set-mode VOLUME sync|async`: switches a running agent's volume between
//! synchronous and asynchronous replication (`POST /v1/volumes/{vol}/mode`), without a restart
//! and without disturbing its clients. To sync, the volume reports `syncing` until the replica
//! is current, then every write waits for the target; to async, at once.

use std::path::PathBuf;

use anyhow::Result;
use hyper::Method;
use serde_json::json;

use blockferry_agent::admin::{encode_segment, DEFAULT_SOCKET};

use crate::client::{print_json, runtime, str_field, Client};

#[derive(Debug, clap::Args)]
pub struct SetModeArgs {
    /// The volume (export) name.
    volume: String,
    /// The replication mode: sync (every write waits for the target) or async.
    #[arg(value_parser = ["sync", "async"])]
    mode: String,
    /// The agent's admin socket (`blockferry agent --admin PATH`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    admin: PathBuf,
    /// Print the agent's JSON answer: {"volume", "previous", "mode", "state"}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SetModeArgs) -> Result<()> {
    runtime()?.block_on(async {
        let client = Client::new(args.admin.clone(), "agent");
        let path = format!("/v1/volumes/{}/mode", encode_segment(&args.volume));
        let v = client.call(Method::POST, &path, Some(json!({ "mode": args.mode }))).await?;
        if args.json {
            return print_json(&v);
        }
        let (previous, mode, state) =
            (str_field(&v, "previous")?, str_field(&v, "mode")?, str_field(&v, "state")?);
        if previous == mode {
            println!("volume {}: already {mode} ({state})", args.volume);
        } else {
            println!("volume {}: {previous} -> {mode} ({state})", args.volume);
        }
        Ok(())
    })
}
