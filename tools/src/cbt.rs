//! `blockferry cbt`: the named change-tracking bitmaps of a running agent, managed through its
//! admin socket (HTTP + JSON, see `blockferry_agent::admin`).

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use blockferry_agent::admin::{encode_segment, DEFAULT_SOCKET};
use blockferry_agent::size::format_size;

use crate::client::{print_json, runtime, str_field, u64_field, Client};

#[derive(Debug, clap::Args)]
pub struct CbtArgs {
    /// The agent's admin socket (`blockferry agent --admin PATH`).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    admin: PathBuf,
    #[command(subcommand)]
    command: CbtCmd,
}

#[derive(Debug, Subcommand)]
enum CbtCmd {
    /// Create an empty bitmap NAME on VOLUME; from now on it records every write.
    Create {
        /// The volume (export) name.
        volume: String,
        /// The bitmap name: 1 to 64 characters from A-Z a-z 0-9 . _ -
        name: String,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// List the bitmaps of VOLUME: name, dirty bytes, generation (clears since creation).
    List {
        /// The volume (export) name.
        volume: String,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Clear bitmap NAME of VOLUME (e.g. once its extents are copied); writes in flight stay
    /// dirty.
    Clear {
        /// The volume (export) name.
        volume: String,
        /// The bitmap name: 1 to 64 characters from A-Z a-z 0-9 . _ -
        name: String,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Remove bitmap NAME from VOLUME.
    Remove {
        /// The volume (export) name.
        volume: String,
        /// The bitmap name.
        name: String,
    },
    /// The byte extents bitmap NAME marks as changed: one "OFFSET LENGTH" line each, then a
    /// total.
    Extents {
        /// The volume (export) name.
        volume: String,
        /// The bitmap name: 1 to 64 characters from A-Z a-z 0-9 . _ -
        name: String,
        /// Print {"volume", "bitmap", "granularity", "dirty_bytes", "extents": [{"offset",
        /// "length"}]}.
        #[arg(long)]
        json: bool,
    },
}

fn bitmaps_path(volume: &str) -> String {
    format!("/v1/volumes/{}/bitmaps", encode_segment(volume))
}

fn bitmap_path(volume: &str, name: &str) -> String {
    format!("{}/{}", bitmaps_path(volume), encode_segment(name))
}

/// The `blockferry cbt` table: NAME, DIRTY (human size), GENERATION.
fn bitmap_table(volume: &str, list: &Value) -> Result<String> {
    let items = list.as_array().ok_or_else(|| anyhow!("the agent's bitmap list is not a list"))?;
    if items.is_empty() {
        return Ok(format!("volume {volume} has no bitmaps\n"));
    }
    let mut rows = vec![("NAME".to_string(), "DIRTY".to_string(), "GENERATION".to_string())];
    for b in items {
        rows.push((
            str_field(b, "name")?.to_string(),
            format_size(u64_field(b, "dirty_bytes")?),
            u64_field(b, "generation")?.to_string(),
        ));
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    Ok(rows.iter().map(|(a, b, c)| format!("{a:<w0$}  {b:>w1$}  {c}\n")).collect())
}

/// The human form of an extents answer: "OFFSET LENGTH" lines, then the total.
fn extents_text(v: &Value) -> Result<String> {
    let extents = v
        .get("extents")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the agent's answer has no extents"))?;
    let mut out = String::new();
    for e in extents {
        out.push_str(&format!("{} {}\n", u64_field(e, "offset")?, u64_field(e, "length")?));
    }
    let dirty = u64_field(v, "dirty_bytes")?;
    let plural = if extents.len() == 1 { "" } else { "s" };
    out.push_str(&format!(
        "total: {} extent{plural}, {} dirty ({dirty} bytes)\n",
        extents.len(),
        format_size(dirty)
    ));
    Ok(out)
}

async fn run_async(args: CbtArgs) -> Result<()> {
    let client = Client::new(args.admin, "agent");
    match args.command {
        CbtCmd::Create { volume, name, json } => {
            let body = serde_json::json!({ "name": name });
            let info = client.call(Method::POST, &bitmaps_path(&volume), Some(body)).await?;
            if json {
                return print_json(&info);
            }
            let granularity = u64_field(&info, "granularity")?;
            println!(
                "created bitmap {name} on volume {volume} (granularity {})",
                format_size(granularity)
            );
        }
        CbtCmd::List { volume, json } => {
            let list = client.call(Method::GET, &bitmaps_path(&volume), None).await?;
            if json {
                return print_json(&list);
            }
            print!("{}", bitmap_table(&volume, &list)?);
        }
        CbtCmd::Clear { volume, name, json } => {
            let path = format!("{}/clear", bitmap_path(&volume, &name));
            let info = client.call(Method::POST, &path, None).await?;
            if json {
                return print_json(&info);
            }
            let generation = u64_field(&info, "generation")?;
            println!("cleared bitmap {name} on volume {volume} (generation {generation})");
        }
        CbtCmd::Remove { volume, name } => {
            client.call(Method::DELETE, &bitmap_path(&volume, &name), None).await?;
            println!("removed bitmap {name} from volume {volume}");
        }
        CbtCmd::Extents { volume, name, json } => {
            let path = format!("{}/extents", bitmap_path(&volume, &name));
            let v = client.call(Method::GET, &path, None).await?;
            if json {
                return print_json(&v);
            }
            print!("{}", extents_text(&v)?);
        }
    }
    Ok(())
}

/// Runs `blockferry cbt ...` on a small single-threaded runtime.
pub fn run(args: CbtArgs) -> Result<()> {
    runtime()?.block_on(run_async(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_tables_and_extents() {
        let list = serde_json::json!([
            {"name": "nightly", "dirty_bytes": 65536, "granularity": 4096, "generation": 3},
            {"name": "b", "dirty_bytes": 0, "granularity": 4096, "generation": 0},
        ]);
        assert_eq!(
            bitmap_table("vm1", &list).unwrap(),
            "NAME     DIRTY  GENERATION\nnightly    64K  3\nb            0  0\n"
        );
        assert_eq!(
            bitmap_table("vm1", &serde_json::json!([])).unwrap(),
            "volume vm1 has no bitmaps\n"
        );
        let ext = serde_json::json!({
            "volume": "vm1", "bitmap": "b", "granularity": 4096, "dirty_bytes": 69632,
            "extents": [{"offset": 0, "length": 4096}, {"offset": 1048576, "length": 65536}],
        });
        assert_eq!(
            extents_text(&ext).unwrap(),
            "0 4096\n1048576 65536\ntotal: 2 extents, 68K dirty (69632 bytes)\n"
        );
        assert_eq!(bitmap_path("a b", "x/y"), "/v1/volumes/a%20b/bitmaps/x%2Fy");
    }
}
