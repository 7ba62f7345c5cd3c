//! `blockferry demo`: the first thing a newcomer runs. Makes (or reuses) a volume under
//! ./blockferry-demo, serves it over NBD, replicates it over QUIC to a target running in the
//! same process on loopback (its own key pairs, made once), says how to attach it, and shows
//! live I/O and replication counters until Ctrl-C.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use blockferry_agent::config::{Config, VolumeConfig};
use blockferry_agent::nbd::Server;
use blockferry_agent::size::{format_size, parse_size};
use blockferry_agent::stats::IoSnapshot;
use blockferry_agent::volume::{Volume, VolumeError};

/// Options of the demo (all have embedded defaults).
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo volume lives.
    #[arg(long, default_value = "./blockferry-demo")]
    dir: PathBuf,
    /// Size of the demo volume when it is created.
    #[arg(long, default_value = "1G")]
    size: String,
    /// Where to serve NBD.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Serve the volume without replicating it.
    #[arg(long)]
    no_replication: bool,
}

/// The demo's DR site: a target in this process, its keys, and the agent's.
struct DemoSite {
    server: std::sync::Arc<blockferry_target::server::TargetServer>,
    key_dir: PathBuf,
    target: SocketAddr,
    target_fp: blockferry_link::Fingerprint,
}

/// Loads or makes a key pair in `dir`.
fn identity(dir: &std::path::Path, name: &str) -> Result<blockferry_link::Identity> {
    if blockferry_link::Identity::exists(dir) {
        return Ok(blockferry_link::Identity::load(dir)?);
    }
    let id = blockferry_link::Identity::generate(name)?;
    id.save(dir)?;
    Ok(id)
}

fn start_site(
    base: &std::path::Path,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<DemoSite> {
    let agent_keys = base.join("keys/agent");
    let target_keys = base.join("keys/target");
    let agent = identity(&agent_keys, "demo-agent")?;
    let target = identity(&target_keys, "demo-target")?;
    let cfg = blockferry_target::server::TargetDaemonConfig {
        listen: "127.0.0.1:0".parse()?,
        dir: base.join("dr-site"),
        key_dir: target_keys,
        admin: None,
        workers: None,
        allow: vec![blockferry_target::server::Allow {
            fingerprint: agent.fingerprint(),
            volumes: None,
        }],
    };
    let server = blockferry_target::server::TargetServer::bind(cfg).map_err(anyhow::Error::msg)?;
    let addr = server.local_addr()?;
    let admin_path = base.join("target.sock");
    let admin = blockferry_target::admin::TargetAdmin::bind(&admin_path, server.clone())?;
    let mut s1 = stop.clone();
    tokio::spawn(async move {
        admin
            .run(async move {
                let _ = s1.wait_for(|s| *s).await;
            })
            .await
    });
    tokio::spawn(server.clone().run(stop));
    Ok(DemoSite { server, key_dir: agent_keys, target: addr, target_fp: target.fingerprint() })
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let vol_dir = args.dir.join("demo");
    let volume = match Volume::open(&vol_dir) {
        Ok(v) => {
            println!("using the existing demo volume in {}", vol_dir.display());
            v
        }
        Err(VolumeError::Missing { .. }) => {
            let size = parse_size(&args.size).context("--size")?;
            let v = Volume::create(&vol_dir, size, 4096, Some("demo"))?;
            println!("created the demo volume in {}", vol_dir.display());
            v
        }
        Err(e) => return Err(e.into()),
    };
    let name = volume.meta.name.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let site =
        if args.no_replication { None } else { Some(start_site(&args.dir, stop_rx.clone())?) };
    let mut vc = VolumeConfig::new(&vol_dir);
    if let Some(site) = &site {
        vc.replication = Some(blockferry_agent::config::ReplicationConfig {
            target: site.target,
            target_fingerprint: site.target_fp,
            mode: "async".into(),
            compression: "lz4".into(),
            budget: None,
            epoch_interval_ms: None,
            bandwidth: None,
            on_disconnect: None,
            block_timeout_ms: None,
            ack_timeout_ms: None,
        });
    }
    let config = Config {
        listen: Some(args.listen),
        key_dir: site.as_ref().map(|s| s.key_dir.clone()),
        volumes: vec![vc],
        ..Config::default()
    };
    let captures = blockferry_agent::repl::captures(&config).map_err(anyhow::Error::msg)?;
    let server = Server::bind_with(&config, captures)
        .await
        .with_context(|| format!("cannot serve the demo volume on {}", args.listen))?;
    let replicators = blockferry_agent::repl::start(&config, &server, stop_rx.clone())
        .map_err(anyhow::Error::msg)?;
    let replicator = replicators.get(&name).cloned();
    let mut admin_volumes = blockferry_agent::admin::AdminVolume::of_server(&server);
    for v in &mut admin_volumes {
        v.replicator = replicators.get(&v.name).cloned();
    }
    let admin_path = args.dir.join("agent.sock");
    let admin = blockferry_agent::admin::Admin::bind(&admin_path, admin_volumes)?;
    let mut s2 = stop_rx.clone();
    tokio::spawn(async move {
        admin
            .run(async move {
                let _ = s2.wait_for(|s| *s).await;
            })
            .await
    });
    let addr = server.local_addr().unwrap_or(args.listen);
    let stats = server.stats(&name).context("the demo export is missing")?;
    let uri = format!("nbd://{addr}/{name}");
    print_attach_help(&uri, &volume, addr);
    if let Some(site) = &site {
        let replica = site
            .server
            .status()
            .first()
            .map(|v| v.replica_path.clone())
            .unwrap_or_else(|| args.dir.join("dr-site").display().to_string());
        println!(
            "Replicating (async, lz4) over QUIC to the DR-site target on {} (in this process).\n\
             \x20 replica:   {replica}\n\
             \x20 status:    blockferry status --admin {}   (and --admin {} for the target)\n\
             \x20 verify:    blockferry verify {name} --admin {}\n",
            site.target,
            admin_path.display(),
            args.dir.join("target.sock").display(),
            admin_path.display(),
        );
    }

    let ticker = tokio::spawn(async move {
        let tty = std::io::stdout().is_terminal();
        let mut last = stats.snapshot();
        let mut last_at = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = stats.snapshot();
            let secs = last_at.elapsed().as_secs_f64();
            let mut line = counters_line(&last, &now, secs);
            if let Some(r) = &replicator {
                let st = r.status();
                line.push_str(&format!(
                    " | repl {} lag {} rpo {:.1}s epoch {}",
                    st.state,
                    format_size_round(st.lag_bytes),
                    st.rpo_seconds,
                    st.last_committed_epoch
                ));
            }
            // On a terminal the line is redrawn in place; in a log, a line every second with
            // activity keeps the log readable.
            if tty {
                print!("\r\x1b[2K{line}");
            } else if now != last {
                println!("{line}");
            }
            let _ = std::io::stdout().flush();
            last = now;
            last_at = Instant::now();
        }
    });

    let seconds = args.seconds;
    let shutdown = async move {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => crate::shutdown_signal().await,
        }
    };
    let result = server.run(shutdown).await;
    let _ = stop_tx.send(true);
    ticker.abort();
    println!(
        "\nstopped; the volume stays in {} (remove the folder to start afresh)",
        vol_dir.display()
    );
    result.map_err(Into::into)
}

fn print_attach_help(uri: &str, volume: &Volume, addr: SocketAddr) {
    let port = addr.port();
    println!(
        "\nserving volume {name} ({size}, uuid {uuid}) at {uri}\n\
         \n\
         Attach it:\n\
         \x20 inspect:        nbdinfo {uri}\n\
         \x20 as a VM disk:   qemu-system-x86_64 -m 1G -drive file={uri},format=raw,if=virtio ...\n\
         \x20 as a block device here (no nbd module needed):\n\
         \x20                 mkdir -p /tmp/bf && nbdfuse /tmp/bf/disk {uri} &\n\
         \x20                 losetup -f --show /tmp/bf/disk   # then mkfs.ext4 / mount the loop device\n\
         \x20 with the kernel's nbd client (where the nbd module exists):\n\
         \x20                 modprobe nbd && nbd-client -N {name} {host} {port} /dev/nbd0\n\
         \x20 quick write/read: qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}\n\
         \n\
         Live I/O counters follow; Ctrl-C stops.\n",
        name = volume.meta.name,
        size = format_size(volume.meta.size),
        uuid = volume.meta.uuid,
        host = addr.ip(),
    );
}

fn counters_line(last: &IoSnapshot, now: &IoSnapshot, secs: f64) -> String {
    let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / secs.max(1e-3);
    let mib = |x: f64| x / (1024.0 * 1024.0);
    format!(
        "conns {} | read {:>8.0} IOPS {:>8.1} MiB/s | write {:>8.0} IOPS {:>8.1} MiB/s | flush {} trim {} zero {} errors {} | total read {} written {}",
        now.connections,
        rate(last.reads, now.reads),
        mib(rate(last.bytes_read, now.bytes_read)),
        rate(last.writes, now.writes),
        mib(rate(last.bytes_written, now.bytes_written)),
        now.flushes,
        now.trims,
        now.zeroes,
        now.errors,
        format_size_round(now.bytes_read),
        format_size_round(now.bytes_written),
    )
}

fn format_size_round(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
