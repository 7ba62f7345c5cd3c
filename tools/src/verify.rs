//! `blockferry verify VOLUME`: asks the agent to compare the volume with its replica on the
//! target (`POST /v1/volumes/{vol}/verify`) and reports the byte ranges that differ.
//!
//! Exit status: 0 when nothing differs, 1 when some ranges differ, 2 when the check could not be
//! made (and for usage errors, as clap does).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Result};
use hyper::Method;
use serde_json::Value;

use blockferry_agent::admin::{encode_segment, DEFAULT_SOCKET};
use blockferry_agent::size::format_size;

use crate::client::{print_json, runtime, u64_field, Client};
use crate::status::approx_size;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The volume (export) name.
    volume: String,
    /// The agent's admin socket (`blockferry agent --admin PATH`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    admin: PathBuf,
    /// Print the agent's JSON answer: {"volume", "blocks", "block_size", "compared_bytes",
    /// "differing": [{"offset", "length"}], "pending", "seconds"}.
    #[arg(long)]
    json: bool,
    /// How long to wait for the comparison (it reads the whole volume on both sides).
    #[arg(long, value_name = "SECS", default_value_t = 6 * 3600)]
    timeout: u64,
}

/// What the comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Same,
    Differs,
}

/// The human form of a verify report.
fn report_text(v: &Value) -> Result<String> {
    let volume = v.get("volume").and_then(Value::as_str).unwrap_or("?");
    let blocks = u64_field(v, "blocks")?;
    let block_size = u64_field(v, "block_size")?;
    let compared = u64_field(v, "compared_bytes")?;
    let pending = v.get("pending").and_then(Value::as_u64).unwrap_or(0);
    let seconds = v.get("seconds").and_then(Value::as_f64).unwrap_or(0.0);
    let differing = v
        .get("differing")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the agent's verify answer has no differing list"))?;
    let mut out = format!(
        "volume {volume}: compared {} ({compared} bytes, {blocks} blocks of {}) in {seconds:.1}s\n",
        approx_size(compared),
        format_size(block_size)
    );
    if pending > 0 {
        out.push_str(&format!(
            "{pending} block{} not replicated yet: excluded from the comparison\n",
            if pending == 1 { "" } else { "s" }
        ));
    }
    if differing.is_empty() {
        out.push_str("OK: the replica matches the source\n");
        return Ok(out);
    }
    let mut total = 0u64;
    let mut lines = String::new();
    for d in differing {
        let (offset, length) = (u64_field(d, "offset")?, u64_field(d, "length")?);
        total += length;
        lines.push_str(&format!("  {offset} {length}\n"));
    }
    let n = differing.len();
    out.push_str(&format!(
        "DIFFERS: {n} range{} ({}, {total} bytes) differ; OFFSET LENGTH:\n{lines}",
        if n == 1 { "" } else { "s" },
        approx_size(total)
    ));
    Ok(out)
}

async fn run_async(args: VerifyArgs) -> Result<Outcome> {
    let mut client = Client::new(args.admin.clone(), "agent");
    client.timeout = Duration::from_secs(args.timeout);
    let path = format!("/v1/volumes/{}/verify", encode_segment(&args.volume));
    let call = client.call(Method::POST, &path, None);
    let progress = show_progress(Client::new(args.admin.clone(), "agent"), args.volume.clone());
    let v = tokio::select! {
        v = call => v?,
        () = progress => unreachable!("the progress display never ends"),
    };
    let differing = v
        .get("differing")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the agent's verify answer has no differing list: {v}"))?;
    let outcome = if differing.is_empty() { Outcome::Same } else { Outcome::Differs };
    if args.json {
        print_json(&v)?;
    } else {
        print!("{}", report_text(&v)?);
    }
    Ok(outcome)
}

/// Prints the comparison's progress on stderr (from the agent's status) while it runs: every
/// 2 s on a terminal, every 10 s otherwise. Never returns.
async fn show_progress(client: Client, volume: String) {
    use std::io::IsTerminal;
    let every = if std::io::stderr().is_terminal() { 2 } else { 10 };
    loop {
        tokio::time::sleep(Duration::from_secs(every)).await;
        let Ok(s) = client.call(Method::GET, "/v1/status", None).await else {
            continue;
        };
        let v = s.get("volumes").and_then(Value::as_array).and_then(|vs| {
            vs.iter().find(|v| v.get("volume").and_then(Value::as_str) == Some(volume.as_str()))
        });
        let Some(p) = v.and_then(|v| v.get("verify")) else {
            continue;
        };
        let (done, total) = (
            p.get("done_bytes").and_then(Value::as_u64).unwrap_or(0),
            p.get("total_bytes").and_then(Value::as_u64).unwrap_or(0),
        );
        if total > 0 {
            eprintln!(
                "verifying {volume}: {:.0}% ({} of {})",
                100.0 * done as f64 / total as f64,
                approx_size(done),
                approx_size(total)
            );
        }
    }
}

pub fn run(args: VerifyArgs) -> Result<Outcome> {
    runtime()?.block_on(run_async(args))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reports_differences() {
        let v = json!({"volume": "vm1", "blocks": 256, "block_size": 4096,
            "compared_bytes": 1044480, "differing": [], "pending": 1, "seconds": 0.42});
        assert_eq!(
            report_text(&v).unwrap(),
            "volume vm1: compared 1020 KiB (1044480 bytes, 256 blocks of 4K) in 0.4s\n\
             1 block not replicated yet: excluded from the comparison\n\
             OK: the replica matches the source\n"
        );
        let v = json!({"volume": "vm1", "blocks": 256, "block_size": 4096,
            "compared_bytes": 1048576, "pending": 0, "seconds": 1.0,
            "differing": [{"offset": 0, "length": 4096}, {"offset": 65536, "length": 8192}]});
        assert_eq!(
            report_text(&v).unwrap(),
            "volume vm1: compared 1.0 MiB (1048576 bytes, 256 blocks of 4K) in 1.0s\n\
             DIFFERS: 2 ranges (12 KiB, 12288 bytes) differ; OFFSET LENGTH:\n  0 4096\n  65536 8192\n"
        );
    }
}
