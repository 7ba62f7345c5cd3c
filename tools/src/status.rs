//! `blockferry status`: what a running agent or target reports on its admin socket
//! (`GET /v1/status`), as a table or as the JSON received.
//!
//! The answer names its role: `{"role": "agent", "volumes": [ReplStatus...]}` or
//! `{"role": "target", "volumes": [VolumeStatus...]}`; the table follows the role.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use hyper::Method;
use serde_json::Value;

use blockferry_agent::admin::DEFAULT_SOCKET;

use crate::client::{print_json, runtime, Client};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The admin socket of an agent (default) or a target (`blockferry target --admin PATH`,
    /// normally /run/blockferry/target.sock).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    admin: PathBuf,
    /// Print the JSON answer (pretty) instead of a table.
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS")]
    watch: Option<f64>,
}

/// An approximate binary size: `512 B`, `1.7 GiB`, `12 MiB` (one decimal below 10).
///
/// `format_size` is exact (it prints bytes unless a suffix divides them); counters and rates
/// are rarely round, so status shows them this way.
pub fn approx_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

/// Seconds as `850ms`, `4.2s`, `12m05s`, `3h02m`.
fn approx_duration(secs: f64) -> String {
    if secs <= 0.0 {
        "0s".into()
    } else if secs < 1.0 {
        format!("{:.0}ms", secs * 1000.0)
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        let s = secs as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = secs as u64 / 60;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

fn u64_of(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

/// A byte count or rate that may be written as a float (`throughput_bps` is).
fn bytes_of(v: &Value, key: &str) -> Option<u64> {
    let x = v.get(key)?;
    x.as_u64().or_else(|| x.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
}

fn num_or_dash(v: &Value, key: &str) -> String {
    u64_of(v, key).map_or_else(|| "-".into(), |n| n.to_string())
}

/// Left-aligned columns, two spaces apart, each row followed by its extra lines.
fn table(header: &[&str], rows: &[(Vec<String>, Vec<String>)]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for (cells, _) in rows {
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for (cells, extra) in rows {
        out.push_str(&line(cells));
        for e in extra {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}

/// The progress line of a resync: `initial-sync 42% 1.7 GiB of 4.0 GiB, 12 MiB/s`.
fn resync_line(v: &Value, resync: &Value) -> String {
    let kind = resync.get("kind").and_then(Value::as_str).unwrap_or_else(|| str_of(v, "state"));
    let done = u64_of(resync, "done_bytes").unwrap_or(0);
    let total = u64_of(resync, "total_bytes").unwrap_or(0);
    let pct = if total == 0 { 100 } else { (done.min(total) as u128 * 100 / total as u128) as u64 };
    let rate = bytes_of(v, "throughput_bps").unwrap_or(0);
    let mut s = format!(
        "{kind} {pct}% {} of {}, {}/s",
        approx_size(done),
        approx_size(total),
        approx_size(rate)
    );
    if let Some(skipped) = u64_of(resync, "skipped_bytes").filter(|&n| n > 0) {
        s.push_str(&format!(" ({} unchanged, skipped)", approx_size(skipped)));
    }
    s
}

fn agent_table(volumes: &[Value]) -> String {
    let header = ["VOLUME", "MODE", "STATE", "LAG", "RPO", "COMMITTED", "THROUGHPUT", "RATIO"];
    let rows: Vec<(Vec<String>, Vec<String>)> = volumes
        .iter()
        .map(|v| {
            let lag = match (u64_of(v, "lag_bytes"), u64_of(v, "lag_epochs")) {
                (Some(b), Some(e)) if e > 0 => format!("{} ({e} ep)", approx_size(b)),
                (Some(b), _) => approx_size(b),
                (None, _) => "-".into(),
            };
            let rpo =
                v.get("rpo_seconds").and_then(Value::as_f64).map_or("-".into(), approx_duration);
            let rate = bytes_of(v, "throughput_bps")
                .map_or("-".into(), |r| format!("{}/s", approx_size(r)));
            let ratio = v
                .get("compression_ratio")
                .and_then(Value::as_f64)
                .filter(|r| *r > 0.0)
                .map_or("-".into(), |r| format!("{r:.2}x"));
            // Sync volumes show their policy: `sync/degrade`, `sync/block`.
            let mode = match (str_of(v, "mode"), v.get("on_disconnect").and_then(Value::as_str)) {
                ("sync", Some(p)) => format!("sync/{p}"),
                (m, _) => m.to_string(),
            };
            let cells = vec![
                str_of(v, "volume").to_string(),
                mode,
                str_of(v, "state").to_string(),
                lag,
                rpo,
                num_or_dash(v, "last_committed_epoch"),
                rate,
                ratio,
            ];
            let mut extra = Vec::new();
            if str_of(v, "mode") == "sync" {
                let waiting = u64_of(v, "sync_waiting").unwrap_or(0);
                let failed = u64_of(v, "sync_failed").unwrap_or(0);
                if waiting > 0 || failed > 0 {
                    extra.push(format!(
                        "sync writes: {waiting} waiting for the target, {failed} failed (EIO)"
                    ));
                }
                if let Some(r) = v.get("reason").and_then(Value::as_str) {
                    extra.push(format!("{}: {r}", str_of(v, "state")));
                }
            }
            if let Some(r) = v.get("resync").filter(|r| r.is_object()) {
                extra.push(resync_line(v, r));
            }
            if let Some(p) = v.get("verify").filter(|p| p.is_object()) {
                let (done, total) =
                    (u64_of(p, "done_bytes").unwrap_or(0), u64_of(p, "total_bytes").unwrap_or(0));
                if total > 0 && done < total {
                    extra.push(format!(
                        "verify {}% {} of {}",
                        (done as u128 * 100 / total as u128),
                        approx_size(done),
                        approx_size(total)
                    ));
                }
            }
            if let Some(e) = v.get("last_error").and_then(Value::as_str) {
                extra.push(format!("last error: {e}"));
            }
            (cells, extra)
        })
        .collect();
    table(&header, &rows)
}

/// `sha256:0123456789ab…`: enough to tell agents apart in a table.
fn short_fingerprint(fp: &str) -> String {
    match fp.char_indices().nth("sha256:".len() + 12) {
        Some((i, _)) => format!("{}…", &fp[..i]),
        None => fp.to_string(),
    }
}

fn target_table(volumes: &[Value]) -> String {
    let header = ["VOLUME", "STATE", "COMMITTED", "APPLIED", "JOURNAL", "AGENT", "REPLICA"];
    let rows: Vec<(Vec<String>, Vec<String>)> = volumes
        .iter()
        .map(|v| {
            let connected = v.get("connected").and_then(Value::as_bool).unwrap_or(false);
            let agent = match v.get("agent").and_then(Value::as_str) {
                Some(fp) if connected => short_fingerprint(fp),
                Some(fp) => format!("{} (gone)", short_fingerprint(fp)),
                None => "-".into(),
            };
            let cells = vec![
                str_of(v, "volume").to_string(),
                str_of(v, "state").to_string(),
                num_or_dash(v, "last_committed_epoch"),
                num_or_dash(v, "applied_epoch"),
                u64_of(v, "journal_bytes").map_or("-".into(), approx_size),
                agent,
                str_of(v, "replica_path").to_string(),
            ];
            let extra = v
                .get("last_error")
                .and_then(Value::as_str)
                .map(|e| format!("last error: {e}"))
                .into_iter()
                .collect();
            (cells, extra)
        })
        .collect();
    table(&header, &rows)
}

/// The human form of a status answer.
pub fn render(status: &Value) -> Result<String> {
    let role = status.get("role").and_then(Value::as_str).ok_or_else(|| {
        anyhow!("the status answer names no role (is this a blockferry admin socket?)")
    })?;
    let volumes = status
        .get("volumes")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the status answer has no volume list"))?;
    if volumes.is_empty() {
        return Ok(match role {
            "target" => "target: no replicas yet (none on disk, no agent has connected)\n".into(),
            _ => format!("{role}: no replicated volumes\n"),
        });
    }
    match role {
        "agent" => Ok(agent_table(volumes)),
        "target" => Ok(target_table(volumes)),
        other => bail!("unknown role {other:?} in the status answer"),
    }
}

async fn run_async(args: StatusArgs) -> Result<()> {
    let client = Client::new(args.admin, "daemon");
    let interval = match args.watch {
        Some(s) if !(s > 0.0 && s.is_finite()) => bail!("--watch takes a number of seconds > 0"),
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    loop {
        let status = client.call(Method::GET, "/v1/status", None).await?;
        if interval.is_some() && !args.json {
            // Home and clear: a screen that refreshes in place.
            print!("\x1b[H\x1b[2J");
        }
        if args.json {
            print_json(&status)?;
        } else {
            print!("{}", render(&status)?);
        }
        let Some(interval) = interval else { return Ok(()) };
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::time::sleep(interval).await;
    }
}

pub fn run(args: StatusArgs) -> Result<()> {
    runtime()?.block_on(run_async(args))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(approx_size(0), "0 B");
        assert_eq!(approx_size(1023), "1023 B");
        assert_eq!(approx_size(1825361100), "1.7 GiB");
        assert_eq!(approx_size(4 << 30), "4.0 GiB");
        assert_eq!(approx_size(12 << 20), "12 MiB");
        assert_eq!(approx_duration(0.25), "250ms");
        assert_eq!(approx_duration(4.24), "4.2s");
        assert_eq!(approx_duration(725.0), "12m05s");
        assert_eq!(approx_duration(10920.0), "3h02m");
    }

    #[test]
    fn renders_agent_status() {
        let s = json!({"role": "agent", "volumes": [
            {"volume": "vm1", "mode": "async", "target": "10.0.0.2:4433", "state": "initial-sync",
             "lag_bytes": 2469606195u64, "lag_epochs": 0, "rpo_seconds": null,
             "last_committed_epoch": 0, "throughput_bps": 12582912.4, "compression_ratio": 1.5,
             "resync": {"kind": "initial-sync", "id": 1, "phase": "copy",
                        "done_bytes": 1825361100u64, "total_bytes": 4294967296u64,
                        "sent_bytes": 1, "skipped_bytes": 0},
             "last_error": null},
            {"volume": "db", "mode": "async", "state": "replicating", "lag_bytes": 4096,
             "lag_epochs": 1, "rpo_seconds": 2.5, "last_committed_epoch": 17,
             "throughput_bps": 0.0, "compression_ratio": 0.0, "resync": null,
             "verify": {"done_bytes": 1073741824u64, "total_bytes": 4294967296u64},
             "last_error": "target unreachable"},
            {"volume": "log", "mode": "sync", "on_disconnect": "block", "state": "blocked",
             "reason": "connection lost", "sync_waiting": 3, "sync_failed": 1, "lag_bytes": 8192,
             "lag_epochs": 0, "rpo_seconds": 4.0, "last_committed_epoch": 5,
             "throughput_bps": 0.0, "compression_ratio": 1.0, "resync": null, "last_error": null},
        ]});
        assert_eq!(
            render(&s).unwrap(),
            "VOLUME  MODE        STATE         LAG             RPO   COMMITTED  THROUGHPUT  RATIO\n\
             vm1     async       initial-sync  2.3 GiB         -     0          12 MiB/s    1.50x\n\
             \x20 initial-sync 42% 1.7 GiB of 4.0 GiB, 12 MiB/s\n\
             db      async       replicating   4.0 KiB (1 ep)  2.5s  17         0 B/s       -\n\
             \x20 verify 25% 1.0 GiB of 4.0 GiB\n\
             \x20 last error: target unreachable\n\
             log     sync/block  blocked       8.0 KiB         4.0s  5          0 B/s       1.00x\n\
             \x20 sync writes: 3 waiting for the target, 1 failed (EIO)\n\
             \x20 blocked: connection lost\n"
        );
    }

    #[test]
    fn renders_target_status() {
        let fp = format!("sha256:{}", "ab".repeat(32));
        let s = json!({"role": "target", "volumes": [
            {"volume": "vm1", "uuid": "u", "state": "consistent", "connected": true,
             "agent": fp, "last_committed_epoch": 9, "applied_epoch": 8,
             "replica_path": "/srv/r/u/image.raw", "journal_bytes": 1048576, "last_error": null},
            {"volume": "old", "uuid": "v", "state": "empty", "connected": false, "agent": null,
             "last_committed_epoch": 0, "applied_epoch": 0, "replica_path": "/srv/r/v/image.raw",
             "journal_bytes": 0, "last_error": "no space"},
        ]});
        assert_eq!(
            render(&s).unwrap(),
            "VOLUME  STATE       COMMITTED  APPLIED  JOURNAL  AGENT                 REPLICA\n\
             vm1     consistent  9          8        1.0 MiB  sha256:abababababab…  /srv/r/u/image.raw\n\
             old     empty       0          0        0 B      -                     /srv/r/v/image.raw\n\
             \x20 last error: no space\n"
        );
        let empty = json!({"role": "target", "volumes": []});
        assert!(render(&empty).unwrap().starts_with("target: no replicas yet"));
        assert!(render(&json!({"volumes": []})).is_err());
    }
}
