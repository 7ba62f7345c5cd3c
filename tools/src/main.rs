//! `blockferry`: one binary, many subcommands.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use blockferry_agent::admin::{Admin, AdminVolume, DEFAULT_SOCKET};
use blockferry_agent::config::{Config, TlsConfig, TlsPolicy, VolumeConfig};
use blockferry_agent::engine::{CacheMode, EngineKind};
use blockferry_agent::nbd::Server;
use blockferry_agent::size::{format_size, parse_size};
use blockferry_agent::volume::Volume;

mod cbt;
mod client;
mod demo;
mod impair;
mod keygen;
mod setmode;
mod status;
mod target;
mod verify;

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
    /// Serve volumes over NBD (the primary-side daemon).
    Agent(Box<AgentArgs>),
    /// Manage the named change-tracking bitmaps of a running agent (through its admin socket).
    Cbt(cbt::CbtArgs),
    /// Make a 1 GiB demo volume and serve it at nbd://127.0.0.1:10809/demo with live counters.
    Demo(demo::DemoArgs),
    /// Make this node's QUIC key pair in DIR and print its fingerprint (--show: print only).
    Keygen(keygen::KeygenArgs),
    /// Run the DR-side daemon: receive replicated volumes from the allowed agents over QUIC.
    Target(target::TargetArgs),
    /// Show the replication status of a running agent or target (through its admin socket).
    Status(status::StatusArgs),
    /// Compare a volume with its replica on the target (exit 0: same, 1: differs, 2: error).
    Verify(verify::VerifyArgs),
    /// A UDP relay that delays, drops, duplicates, reorders and rate-limits datagrams (tests).
    Impair(impair::ImpairArgs),
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// A TOML config file; the other options add to it (volumes) or override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A volume directory to export (repeatable); the export name is the volume's name.
    #[arg(long = "volume", value_name = "DIR")]
    volumes: Vec<PathBuf>,
    /// TCP address to listen on (port 0: any free port).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Unix socket path to listen on.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Export the --volume volumes read-only.
    #[arg(long)]
    read_only: bool,
    /// Cache mode of the --volume volumes: none (O_DIRECT) or writeback.
    #[arg(long, default_value = "writeback")]
    cache: CacheMode,
    /// Disk engine of the --volume volumes: uring or sync.
    #[arg(long, default_value = "uring")]
    engine: EngineKind,
    /// Server certificate (PEM) for NBD_OPT_STARTTLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// TLS mode: off, optional or required.
    #[arg(long)]
    tls: Option<TlsPolicy>,
    /// The admin socket (HTTP + JSON, mode 0600) that `blockferry cbt` talks to; overrides
    /// `admin` in --config. Default: /run/blockferry/agent.sock.
    #[arg(long, value_name = "PATH")]
    admin: Option<PathBuf>,
    /// Serve no admin socket.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
    /// This agent's QUIC key pair (made by `blockferry keygen --dir`), for replication.
    #[arg(long, value_name = "DIR")]
    key_dir: Option<PathBuf>,
    /// Replicate the --volume volumes to the target at this QUIC address.
    #[arg(long, value_name = "ADDR", requires = "target_fingerprint")]
    target: Option<std::net::SocketAddr>,
    /// The target certificate's fingerprint (sha256:...), printed by its `blockferry keygen`.
    #[arg(long, value_name = "FP", requires = "target")]
    target_fingerprint: Option<String>,
    /// Replication mode of the --volume volumes: async or sync (every write waits for the
    /// target; see --on-disconnect).
    #[arg(long, default_value = "async", requires = "target")]
    mode: String,
    /// Compression of replicated blocks: lz4, zstd, zstd:LEVEL or off.
    #[arg(long, default_value = "lz4", requires = "target")]
    compression: String,
    /// Epoch buffer per volume (e.g. 256M); beyond it the volume catches up from its bitmap.
    #[arg(long, requires = "target")]
    budget: Option<String>,
    /// Bandwidth limit per volume in bytes per second (e.g. 12M).
    #[arg(long, requires = "target")]
    bandwidth: Option<String>,
    /// Epochs close this often, in milliseconds (default 1000).
    #[arg(long, requires = "target")]
    epoch_interval_ms: Option<u64>,
    /// Sync mode, target unreachable: degrade (write on locally) or block (EIO after
    /// --block-timeout-ms).
    #[arg(long, requires = "target")]
    on_disconnect: Option<String>,
    /// With --on-disconnect block: how long writes wait for the target (default 30000).
    #[arg(long, requires = "target")]
    block_timeout_ms: Option<u64>,
    /// Sync mode: a write the target leaves unanswered this long is a disconnect (default 5000).
    #[arg(long, requires = "target")]
    ack_timeout_ms: Option<u64>,
    /// Threads of the async runtime (default: half the host's cores, 1 to 8).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

impl AgentArgs {
    fn into_config(self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if self.listen.is_some() {
            config.listen = self.listen;
        }
        if self.unix.is_some() {
            config.unix = self.unix;
        }
        if self.admin.is_some() {
            config.admin = self.admin;
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            config.tls = Some(TlsConfig {
                cert,
                key,
                client_ca: self.tls_client_ca,
                mode: self.tls.unwrap_or(TlsPolicy::Optional),
            });
        } else if let Some(mode) = self.tls {
            match &mut config.tls {
                Some(t) => t.mode = mode,
                None if mode == TlsPolicy::Off => {}
                None => anyhow::bail!(
                    "--tls {mode:?} needs --tls-cert and --tls-key (or [tls] in --config)"
                ),
            }
        }
        if self.key_dir.is_some() {
            config.key_dir = self.key_dir;
        }
        if self.workers.is_some() {
            config.workers = self.workers;
        }
        let replication = match (self.target, &self.target_fingerprint) {
            (Some(target), Some(fp)) => Some(blockferry_agent::config::ReplicationConfig {
                target,
                target_fingerprint: fp
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--target-fingerprint: {e}"))?,
                mode: self.mode.clone(),
                compression: self.compression.clone(),
                budget: self.budget.as_deref().map(parse_size).transpose()?,
                epoch_interval_ms: self.epoch_interval_ms,
                bandwidth: self.bandwidth.as_deref().map(parse_size).transpose()?,
                on_disconnect: self.on_disconnect.clone(),
                block_timeout_ms: self.block_timeout_ms,
                ack_timeout_ms: self.ack_timeout_ms,
            }),
            _ => None,
        };
        for dir in self.volumes {
            let mut v = VolumeConfig::new(dir);
            v.read_only = self.read_only;
            v.cache = self.cache;
            v.engine = self.engine;
            v.replication = replication.clone();
            config.volumes.push(v);
        }
        Ok(config)
    }
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
    /// Switch a running agent's volume between sync and async replication (through its admin
    /// socket): to sync it reports "syncing" until the replica is current; to async at once.
    SetMode(setmode::SetModeArgs),
}

/// Logs go to stderr (stdout carries the one "listening on" line); RUST_LOG filters them.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs written to files stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_ansi(ansi)
        .init();
}

/// stderr for logs, where a failed write (the log file's disk is full, a closed pipe) loses
/// the line instead of failing: tracing's fallback for a failing writer is `eprintln!`, which
/// panics, and a daemon must not die (or drop connections) because its log cannot be written.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        tracing::warn!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

/// The runtime of the agent, the target, the demo and the relay, with `workers` threads. The data
/// path is a reader and a writer per connection plus short request tasks; large copies hand
/// their worker to another thread while they run (`block_in_place`), blocking disk work runs on
/// the blocking pool. `None`: the default count. See docs/decisions.md, "One runtime thread on
/// small hosts".
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let workers = match workers {
        Some(n) => blockferry_agent::config::check_workers(n)?,
        None => blockferry_agent::config::default_workers(),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(32)
        .thread_keep_alive(std::time::Duration::from_secs(10))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_agent(args: AgentArgs) -> Result<()> {
    init_tracing();
    let no_admin = args.no_admin;
    let config = args.into_config()?;
    runtime(config.workers)?.block_on(async {
        config.validate()?;
        let captures = blockferry_agent::repl::captures(&config).map_err(anyhow::Error::msg)?;
        let server = Server::bind_with(&config, captures).await?;
        // One signal stops the servers and the replication; each drains its own work.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let replicators = match blockferry_agent::repl::start(&config, &server, stop_rx.clone()) {
            Ok(r) => r,
            Err(e) => {
                if let Some(unix) = server.unix_path() {
                    let _ = std::fs::remove_file(unix);
                }
                anyhow::bail!(e);
            }
        };
        let mut volumes = AdminVolume::of_server(&server);
        for v in &mut volumes {
            v.replicator = replicators.get(&v.name).cloned();
        }
        let admin = if no_admin {
            None
        } else {
            let path = config.admin.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
            match Admin::bind(&path, volumes) {
                Ok(admin) => Some(admin),
                Err(e) => {
                    // The NBD socket is bound already: do not leave it behind.
                    if let Some(unix) = server.unix_path() {
                        let _ = std::fs::remove_file(unix);
                    }
                    return Err(e.into());
                }
            }
        };
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let mut at = Vec::new();
        if let Some(addr) = server.local_addr() {
            at.push(addr.to_string());
        }
        if let Some(path) = server.unix_path() {
            at.push(format!("unix:{}", path.display()));
        }
        let exports: Vec<String> = server
            .exports()
            .iter()
            .map(|e| {
                let mode = if e.read_only { "ro" } else { "rw" };
                let tls = if e.tls_required { ", tls" } else { "" };
                format!("export {} {} {mode}{tls}", e.name, format_size(e.size))
            })
            .collect();
        let admin_at = match &admin {
            Some(a) => format!("; admin on {}", a.path().display()),
            None => String::new(),
        };
        println!("listening on {} ({}){admin_at}", at.join(" and "), exports.join(", "));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let admin_done = async {
            if let Some(admin) = admin {
                admin.run(stopped(stop_rx.clone())).await;
            }
        };
        let (served, ()) = tokio::join!(server.run(stopped(stop_rx.clone())), admin_done);
        served?;
        anyhow::Ok(())
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => run_agent(*args)?,
        Command::Cbt(args) => cbt::run(args)?,
        Command::Keygen(args) => keygen::run(args)?,
        Command::Target(args) => target::run(args)?,
        Command::Status(args) => status::run(args)?,
        Command::Verify(args) => match verify::run(args) {
            Ok(verify::Outcome::Same) => {}
            Ok(verify::Outcome::Differs) => std::process::exit(1),
            Err(e) => {
                eprintln!("Error: {e:?}");
                std::process::exit(2);
            }
        },
        Command::Impair(args) => {
            init_tracing();
            runtime(Some(2))?.block_on(impair::main(args))?;
        }
        Command::Demo(args) => {
            init_tracing();
            runtime(None)?.block_on(demo::run(args))?;
        }
        Command::Volume(VolumeCmd::Create { dir, size, block_size, name }) => {
            let size = parse_size(&size).context("--size")?;
            let block_size = parse_size(&block_size).context("--block-size")?;
            let v = Volume::create(&dir, size, block_size, name.as_deref())?;
            print!("created volume\n{}", v.describe());
        }
        Command::Volume(VolumeCmd::SetMode(args)) => setmode::run(args)?,
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
