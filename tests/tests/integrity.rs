//! Data integrity over the wire: random operations checked against an in-memory model, and
//! concurrent unaligned writes that share sectors (the read-modify-write path of --cache none),
//! in every cache mode and engine.

use std::io::Write;
use std::net::SocketAddr;
use std::thread;

use anyhow::{ensure, Context, Result};
use blockferry_tests::nbd::{self, *};
use blockferry_tests::{create_volume, tempdir, AgentConfig, Prng};

const SIZE: u64 = 8 << 20;

const CONFIGS: [(&str, &str); 4] =
    [("none", "uring"), ("writeback", "uring"), ("none", "sync"), ("writeback", "sync")];

fn with_each_config(name: &str, f: impl Fn(SocketAddr, &str) -> Result<()>) {
    let tmp = tempdir();
    let mut failures = Vec::new();
    for (cache, engine) in CONFIGS {
        let vol = tmp.path().join(format!("{name}-{cache}-{engine}"));
        create_volume(&vol, &SIZE.to_string(), &["--name", name]);
        let log = tmp.path().join(format!("agent-{cache}-{engine}.log"));
        let mut agent = AgentConfig::new(&vol).cache(cache).engine(engine).start(&log);
        if let Err(e) = f(agent.addr, name) {
            failures.push(format!("--cache {cache} --engine {engine}: {e:#}"));
        }
        if !agent.is_alive() {
            failures.push(format!("--cache {cache} --engine {engine}: the agent died"));
        }
        // The image file agrees with what clients read (checked by the caller's last read).
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random writes (FUA or not), write-zeroes (hole or not), flushes and reads, unaligned, each
/// checked against a plain byte array.
fn random_ops(addr: SocketAddr, export: &str) -> Result<()> {
    let seed = 0x5EED_0001;
    let mut rng = Prng::new(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut c = nbd::connect(addr, export, true)?;
    let mut simple = nbd::connect(addr, export, false)?;
    // Requests honour the advertised minimum block size (512 with --cache none, 1 with
    // writeback); below it the server may refuse with EINVAL, which must not change the data.
    let align = u64::from(c.block_sizes.context("no NBD_INFO_BLOCK_SIZE")?.minimum);
    if align > 1 {
        let req = Request::new(CMD_WRITE, 1000, 100);
        let reply = c.call(req, &[0xAB; 100])?;
        ensure!(
            reply.error == EINVAL || reply.error == 0,
            "a write below the minimum block size got {}",
            reply.describe_error()
        );
        if reply.error == 0 {
            model[1000..1100].fill(0xAB);
        }
        ensure!(c.read(0, 4096)? == model[..4096], "a refused unaligned write changed data");
    }
    for op in 0..800u32 {
        let r = rng.next_u64();
        let len = 1 + (rng.next_u64() % 70_000) as usize;
        let len = (len as u64).div_ceil(align) as usize * align as usize;
        // Offsets near the end and sector edges are likelier than uniform.
        let offset = match r % 4 {
            0 => (rng.next_u64() % 64) * 512 + rng.next_u64() % 3,
            1 => SIZE - len as u64 - rng.next_u64() % 700,
            _ => rng.next_u64() % (SIZE - len as u64),
        }
        .min(SIZE - len as u64)
            / align
            * align;
        let what = format!("op {op} (seed {seed:#x}) at {offset}+{len}");
        match (r >> 8) % 8 {
            0..=2 => {
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                let fua = if r & (1 << 20) != 0 { CMD_FLAG_FUA } else { 0 };
                c.write(offset, &data, fua).with_context(|| format!("write, {what}"))?;
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            3 => {
                let flags = if r & (1 << 21) != 0 { CMD_FLAG_NO_HOLE } else { 0 };
                let req = Request::new(CMD_WRITE_ZEROES, offset, len as u32).flags(flags);
                let reply = c.call(req, &[])?;
                ensure!(reply.error == 0, "write-zeroes, {what}: {}", reply.describe_error());
                model[offset as usize..offset as usize + len].fill(0);
            }
            4 => c.flush().with_context(|| format!("flush, {what}"))?,
            _ => {
                let client = if r & (1 << 22) != 0 { &mut c } else { &mut simple };
                let got =
                    client.read(offset, len as u32).with_context(|| format!("read, {what}"))?;
                let want = &model[offset as usize..offset as usize + len];
                if got != want {
                    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    anyhow::bail!(
                        "read, {what}: differs from the model first at byte {} (got {:#04x}, \
                         want {:#04x})",
                        offset + first as u64,
                        got[first],
                        want[first]
                    );
                }
            }
        }
    }
    // Finally the whole volume, in 1 MiB reads.
    for off in (0..SIZE).step_by(1 << 20) {
        let got = c.read(off, 1 << 20)?;
        ensure!(got == model[off as usize..off as usize + (1 << 20)], "final read at {off}");
    }
    c.disconnect()?;
    simple.disconnect()
}

#[test]
fn random_unaligned_ops_match_a_model_in_every_cache_mode_and_engine() {
    with_each_config("model", random_ops);
}

/// Four connections, each pipelining many small writes into slices that share sectors and
/// 4 KiB blocks with the other connections' slices: 100 bytes where the minimum block size is 1,
/// else the minimum (512 with --cache none, below the 4 KiB of the block and maybe the device).
/// A read-modify-write that is not serialised loses some of them.
fn shared_sector_writes(addr: SocketAddr, export: &str) -> Result<()> {
    const CONNS: u64 = 4;
    const BLOCKS: u64 = 128;
    let probe = nbd::connect(addr, export, true)?;
    let min = u64::from(probe.block_sizes.context("no NBD_INFO_BLOCK_SIZE")?.minimum);
    drop(probe);
    let slice_len = min.max(100);
    let (slice, slices) = (slice_len, 4096 / slice_len);
    let value = move |blk: u64, s: u64| -> Vec<u8> {
        let mut v = vec![0u8; slice as usize];
        Prng::new(blk * 1000 + s + 1).fill(&mut v);
        v
    };
    let handles: Vec<_> = (0..CONNS)
        .map(|conn| {
            let export = export.to_string();
            thread::spawn(move || -> Result<()> {
                let mut c = nbd::connect(addr, &export, conn % 2 == 0)?;
                let mut bytes = Vec::new();
                for blk in 0..BLOCKS {
                    for s in (conn..slices).step_by(CONNS as usize) {
                        let req = Request::new(CMD_WRITE, blk * 4096 + s * slice, slice as u32);
                        let cookie = c.expect(req);
                        bytes.extend_from_slice(&req.encode(cookie));
                        bytes.extend_from_slice(&value(blk, s));
                    }
                }
                let n = c.in_flight();
                let mut w = c.try_clone_stream()?;
                let sender = thread::spawn(move || w.write_all(&bytes));
                for _ in 0..n {
                    let r = c.recv()?;
                    ensure!(r.error == 0, "a slice write failed: {}", r.describe_error());
                }
                sender.join().expect("sender")?;
                c.disconnect()
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread")?;
    }
    let mut c = nbd::connect(addr, export, true)?;
    let mut lost = Vec::new();
    for blk in 0..BLOCKS {
        let got = c.read(blk * 4096, 4096)?;
        for s in 0..slices {
            let at = (s * slice) as usize;
            if got[at..at + slice as usize] != value(blk, s)[..] {
                lost.push(blk * 4096 + s * slice);
            }
        }
        ensure!(got[(slices * slice) as usize..].iter().all(|&b| b == 0), "tail of block {blk}");
    }
    ensure!(
        lost.is_empty(),
        "{} of {} concurrent 100-byte writes were lost (first at offsets {:?})",
        lost.len(),
        BLOCKS * slices,
        &lost[..lost.len().min(8)]
    );
    Ok(())
}

#[test]
fn concurrent_writes_sharing_sectors_are_all_kept() {
    with_each_config("shared", shared_sector_writes);
}
