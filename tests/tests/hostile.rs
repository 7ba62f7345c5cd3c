//! Hostile and malformed NBD input over raw sockets. Each case states the reply the protocol
//! requires; after it, a new connection must still be served. All cases run (failures are
//! collected, not stopped at), then the agent must still be alive and `nbdinfo` must work.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blockferry_tests::nbd::{self, *};
use blockferry_tests::{create_volume, require_tool, run, tempdir, AgentConfig, Prng};

const SIZE: u64 = 64 << 20;
const RO_SIZE: u64 = 16 << 20;
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

struct Ctx {
    addr: SocketAddr,
    ro_addr: SocketAddr,
    export: String,
    ro_export: String,
    agent_pid: u32,
}

impl Ctx {
    fn client(&self) -> Result<Client> {
        nbd::connect(self.addr, &self.export, true)
    }

    fn simple_client(&self) -> Result<Client> {
        nbd::connect(self.addr, &self.export, false)
    }

    fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.agent_pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    Prng::new(seed).fill(&mut v);
    v
}

/// Expects one reply for `cookie` with one of the `allowed` error values.
fn expect_error(c: &mut Client, cookie: u64, allowed: &[u32], what: &str) -> Result<()> {
    let r = c.recv().with_context(|| format!("{what}: waiting for the reply"))?;
    ensure!(r.cookie == cookie, "{what}: reply for cookie {:#x}, expected {cookie:#x}", r.cookie);
    ensure!(
        allowed.contains(&r.error),
        "{what}: got error {}, expected one of {:?}",
        r.describe_error(),
        allowed.iter().map(|e| errno_name(*e)).collect::<Vec<_>>()
    );
    Ok(())
}

fn call_expect(
    c: &mut Client,
    req: Request,
    payload: &[u8],
    allowed: &[u32],
    what: &str,
) -> Result<()> {
    let cookie = c.send(req, payload).with_context(|| format!("{what}: sending"))?;
    expect_error(c, cookie, allowed, what)
}

// ---- handshake -------------------------------------------------------------------------------

fn unknown_client_flags(ctx: &Ctx) -> Result<()> {
    let mut h = Handshake::start(ctx.addr)?;
    h.send_client_flags(FLAG_C_FIXED_NEWSTYLE | 0x8000_0000)?;
    // The server MUST drop the connection on unknown client flags.
    expect_closed(&mut h.stream, CLOSE_LIMIT)
}

fn bad_option_magic(ctx: &Ctx) -> Result<()> {
    let mut h = Handshake::start_fixed(ctx.addr)?;
    let mut b = Vec::new();
    b.extend_from_slice(&0xdead_beef_0bad_f00du64.to_be_bytes());
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    h.send_raw(&b)?;
    expect_closed(&mut h.stream, CLOSE_LIMIT)
}

fn garbage_after_client_flags(ctx: &Ctx) -> Result<()> {
    let mut h = Handshake::start_fixed(ctx.addr)?;
    h.send_raw(&pattern(7, 256))?;
    expect_closed(&mut h.stream, CLOSE_LIMIT)
}

fn unknown_option_with_payload(ctx: &Ctx) -> Result<()> {
    let mut h = Handshake::start_fixed(ctx.addr)?;
    h.send_option(0x4242, &pattern(1, 100))?;
    let r = h.read_option_reply()?;
    ensure!(r.option == 0x4242, "reply names option {:#x}, expected 0x4242", r.option);
    ensure!(
        r.reply_type == REP_ERR_UNSUP,
        "reply type {:#x}, expected NBD_REP_ERR_UNSUP",
        r.reply_type
    );
    let mut c = h.go(&ctx.export, true).context("NBD_OPT_GO after the unknown option")?;
    c.check_serves(1 << 20, 1)
}

fn go_with_malformed_data(ctx: &Ctx) -> Result<()> {
    let mut h = Handshake::start_fixed(ctx.addr)?;
    // The name length says 1000 bytes but the option carries 10.
    let mut d = 1000u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"abcdef");
    h.send_option(OPT_GO, &d)?;
    let r = h.read_option_reply().context("reply to a malformed NBD_OPT_GO")?;
    ensure!(
        r.reply_type == REP_ERR_INVALID,
        "reply type {:#x}, expected NBD_REP_ERR_INVALID",
        r.reply_type
    );
    // Info requests count beyond the data.
    let mut d = (ctx.export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(ctx.export.as_bytes());
    d.extend_from_slice(&5u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    h.send_option(OPT_GO, &d)?;
    let r = h.read_option_reply().context("reply to an NBD_OPT_GO with a short info list")?;
    ensure!(
        r.reply_type == REP_ERR_INVALID,
        "reply type {:#x} to a short info list, expected NBD_REP_ERR_INVALID",
        r.reply_type
    );
    let mut c = h.go(&ctx.export, true).context("a good NBD_OPT_GO afterwards")?;
    c.check_serves(1 << 20, 2)
}

fn go_unknown_export(ctx: &Ctx) -> Result<()> {
    let h = Handshake::start_fixed(ctx.addr)?;
    match h.try_go("no-such-export")? {
        Ok(_) => bail!("NBD_OPT_GO of an unknown export succeeded"),
        Err((h, r)) => {
            ensure!(
                r.reply_type == REP_ERR_UNKNOWN,
                "reply type {:#x}, expected NBD_REP_ERR_UNKNOWN",
                r.reply_type
            );
            let mut c = h.go(&ctx.export, false).context("NBD_OPT_GO of the right export")?;
            c.check_serves(1 << 20, 3)
        }
    }
}

fn export_name_unknown_closes(ctx: &Ctx) -> Result<()> {
    let mut h = Handshake::start_fixed(ctx.addr)?;
    h.send_option(OPT_EXPORT_NAME, b"no-such-export")?;
    expect_closed(&mut h.stream, CLOSE_LIMIT)
}

fn export_name_works(ctx: &Ctx) -> Result<()> {
    // The old way in: NBD_OPT_EXPORT_NAME, answered by size + flags (+ no zeroes).
    let mut h = Handshake::start_fixed(ctx.addr)?;
    h.send_option(OPT_EXPORT_NAME, ctx.export.as_bytes())?;
    let mut b = [0u8; 10];
    std::io::Read::read_exact(&mut h.stream, &mut b).context("NBD_OPT_EXPORT_NAME reply")?;
    let size = u64::from_be_bytes(b[..8].try_into().unwrap());
    ensure!(size == SIZE, "export size {size}, expected {SIZE}");
    Ok(())
}

fn huge_option_length(ctx: &Ctx) -> Result<()> {
    let before = ctx.peak_rss();
    let mut h = Handshake::start_fixed(ctx.addr)?;
    h.send_option_header(0x4243, 0xFFFF_FFF0)?;
    h.send_raw(&pattern(3, 4096))?;
    thread::sleep(Duration::from_millis(300));
    let _ = h.stream.shutdown(Shutdown::Write);
    expect_closed(&mut h.stream, CLOSE_LIMIT)?;
    let grown = ctx.peak_rss().saturating_sub(before);
    ensure!(grown < 64 << 20, "the agent's peak RSS grew by {grown} bytes for a 4 GiB option");
    Ok(())
}

fn half_open_handshakes(ctx: &Ctx) -> Result<()> {
    // Fifty connections that never finish the handshake must not stop others being served.
    let idle: Vec<TcpStream> =
        (0..50).map(|_| TcpStream::connect(ctx.addr)).collect::<Result<_, _>>()?;
    let mut c = ctx.client().context("a client while 50 handshakes hang")?;
    c.check_serves(2 << 20, 4)?;
    drop(idle);
    Ok(())
}

// ---- transmission ----------------------------------------------------------------------------

fn unknown_command(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    call_expect(&mut c, Request::new(0x42, 0, 512), &[], &[EINVAL], "command 0x42")?;
    call_expect(&mut c, Request::new(0xffff, 0, 0), &[], &[EINVAL], "command 0xffff")?;
    c.check_serves(3 << 20, 5)
}

fn unknown_flags(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    let read = Request::new(CMD_READ, 0, 4096).flags(0x4000);
    call_expect(&mut c, read, &[], &[EINVAL], "read with flag 0x4000")?;
    // A write with an unknown flag: refused, and its payload consumed (the next request works).
    let write = Request::new(CMD_WRITE, 4 << 20, 4096).flags(0x8000);
    call_expect(&mut c, write, &pattern(9, 4096), &[EINVAL], "write with flag 0x8000")?;
    let back = c.read(4 << 20, 4096)?;
    ensure!(back != pattern(9, 4096), "a write refused with EINVAL was applied anyway");
    c.check_serves(4 << 20, 6)
}

fn fast_zero(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    let req = Request::new(CMD_WRITE_ZEROES, 5 << 20, 65536).flags(CMD_FLAG_FAST_ZERO);
    if c.flags & TF_SEND_FAST_ZERO == 0 {
        call_expect(&mut c, req, &[], &[EINVAL], "FAST_ZERO, not advertised")?;
    } else {
        call_expect(&mut c, req, &[], &[0, ENOTSUP], "FAST_ZERO, advertised")?;
    }
    c.check_serves(5 << 20, 7)
}

fn dont_fragment(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    let req = Request::new(CMD_READ, 0, 65536).flags(CMD_FLAG_DF);
    if c.flags & TF_SEND_DF == 0 {
        call_expect(&mut c, req, &[], &[EINVAL], "read with DF, not advertised")?;
    } else {
        call_expect(&mut c, req, &[], &[0], "read with DF, advertised")?;
    }
    // DF on a simple-reply connection: the flag is never advertised there.
    let mut s = ctx.simple_client()?;
    ensure!(s.flags & TF_SEND_DF == 0, "NBD_FLAG_SEND_DF without structured replies");
    call_expect(&mut s, req, &[], &[EINVAL], "read with DF without structured replies")?;
    s.check_serves(5 << 20, 14)?;
    c.check_serves(5 << 20, 15)
}

fn offset_length_overflow(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    let off = u64::MAX - 511;
    call_expect(&mut c, Request::new(CMD_READ, off, 1024), &[], &[EINVAL], "read overflow")?;
    call_expect(&mut c, Request::new(CMD_TRIM, off, 1024), &[], &[EINVAL], "trim overflow")?;
    call_expect(
        &mut c,
        Request::new(CMD_WRITE_ZEROES, off, 1024),
        &[],
        &[EINVAL, ENOSPC],
        "write-zeroes overflow",
    )?;
    call_expect(
        &mut c,
        Request::new(CMD_WRITE, off, 1024),
        &pattern(4, 1024),
        &[EINVAL, ENOSPC],
        "write overflow",
    )?;
    c.check_serves(6 << 20, 8)
}

fn read_beyond_end(ctx: &Ctx) -> Result<()> {
    for structured in [true, false] {
        let mut c = if structured { ctx.client()? } else { ctx.simple_client()? };
        let what = if structured { "structured" } else { "simple" };
        let r1 = Request::new(CMD_READ, SIZE - 512, 1024);
        call_expect(&mut c, r1, &[], &[EINVAL], &format!("read across the end ({what})"))?;
        let r2 = Request::new(CMD_READ, SIZE, 512);
        call_expect(&mut c, r2, &[], &[EINVAL], &format!("read past the end ({what})"))?;
        c.read(SIZE - 4096, 4096).context("the last block is readable")?;
        c.check_serves(7 << 20, 9)?;
    }
    Ok(())
}

fn write_beyond_end(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    let w = Request::new(CMD_WRITE, SIZE - 2048, 4096);
    call_expect(&mut c, w, &pattern(5, 4096), &[ENOSPC], "write across the end")?;
    let w = Request::new(CMD_WRITE, SIZE, 512);
    call_expect(&mut c, w, &pattern(5, 512), &[ENOSPC], "write past the end")?;
    let z = Request::new(CMD_WRITE_ZEROES, SIZE - 2048, 4096);
    call_expect(&mut c, z, &[], &[ENOSPC, EINVAL], "write-zeroes across the end")?;
    let t = Request::new(CMD_TRIM, SIZE - 2048, 4096);
    call_expect(&mut c, t, &[], &[EINVAL, ENOSPC], "trim across the end")?;
    c.write(SIZE - 4096, &pattern(6, 4096), CMD_FLAG_FUA).context("the last block is writable")?;
    ensure!(c.read(SIZE - 4096, 4096)? == pattern(6, 4096), "the last block reads back wrong");
    c.check_serves(8 << 20, 10)
}

fn read_only_export(ctx: &Ctx) -> Result<()> {
    let mut c = nbd::connect(ctx.ro_addr, &ctx.ro_export, true)?;
    ensure!(c.flags & TF_READ_ONLY != 0, "--read-only export lacks NBD_FLAG_READ_ONLY");
    let before = c.read(0, 8192)?;
    let w = Request::new(CMD_WRITE, 0, 4096);
    call_expect(&mut c, w, &pattern(8, 4096), &[EPERM], "write to a read-only export")?;
    call_expect(&mut c, Request::new(CMD_TRIM, 0, 4096), &[], &[EPERM], "trim, read-only")?;
    let z = Request::new(CMD_WRITE_ZEROES, 4096, 4096);
    call_expect(&mut c, z, &[], &[EPERM], "write-zeroes to a read-only export")?;
    ensure!(c.read(0, 8192)? == before, "a refused write changed the read-only export");
    ensure!(c.size == RO_SIZE, "read-only export size {}", c.size);
    c.check_serves(0, 11)
}

fn oversized_read(ctx: &Ctx) -> Result<()> {
    let before = ctx.peak_rss();
    let mut c = ctx.client()?;
    let cookie = c.send(Request::new(CMD_READ, 0, 64 << 20), &[])?;
    match c.recv() {
        Ok(r) => {
            ensure!(r.cookie == cookie, "reply to the wrong cookie");
            ensure!(r.error == EINVAL, "a 64 MiB read got {}, expected EINVAL", r.describe_error());
            c.check_serves(9 << 20, 12).context("the same connection after the refusal")?;
        }
        Err(e) if is_closed(&e) => {}
        Err(e) => return Err(e.context("a 64 MiB read")),
    }
    let grown = ctx.peak_rss().saturating_sub(before);
    ensure!(grown < 48 << 20, "the agent's peak RSS grew by {grown} bytes for a refused read");
    Ok(())
}

fn oversized_write(ctx: &Ctx) -> Result<()> {
    let before = ctx.peak_rss();
    let mut c = ctx.client()?;
    c.stream().set_read_timeout(Some(CLOSE_LIMIT))?;
    let cookie = c.send(Request::new(CMD_WRITE, 0, 0xFFFF_0000), &pattern(10, 4096))?;
    match c.recv() {
        Ok(r) => {
            ensure!(r.cookie == cookie, "reply to the wrong cookie");
            ensure!(r.error == EINVAL, "a 4 GiB write got {}, expected EINVAL", r.describe_error());
        }
        Err(e) if is_closed(&e) => {}
        Err(e) => {
            return Err(e.context(
                "a 4 GiB write header: the server neither refused it nor closed within 5 s \
                 (it is waiting for the payload)",
            ))
        }
    }
    let grown = ctx.peak_rss().saturating_sub(before);
    ensure!(grown < 48 << 20, "the agent's peak RSS grew by {grown} bytes for a refused write");
    Ok(())
}

fn truncated_write_then_eof(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    c.write(10 << 20, &pattern(11, 1 << 20), 0)?;
    let cookie = c.send(Request::new(CMD_WRITE, 10 << 20, 1 << 20), &pattern(12, 100 << 10))?;
    c.stream().shutdown(Shutdown::Write)?;
    c.stream().set_read_timeout(Some(CLOSE_LIMIT))?;
    match c.recv() {
        Ok(r) => ensure!(
            r.cookie == cookie && r.error != 0,
            "a write whose payload was cut short got a success reply"
        ),
        Err(e) if is_closed(&e) => {}
        Err(e) => return Err(e.context("the server did not close after the truncated write")),
    }
    Ok(())
}

fn bad_request_magic(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    let mut b = Request::new(CMD_READ, 0, 512).encode(1);
    b[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    c.send_raw(&b)?;
    expect_closed(c.stream(), CLOSE_LIMIT)
}

/// Sends `bufs` from a thread (so a full socket cannot deadlock us against the server).
fn send_in_background(s: TcpStream, bufs: Vec<Vec<u8>>) -> thread::JoinHandle<Result<()>> {
    thread::spawn(move || {
        let mut s = s;
        for b in bufs {
            s.write_all(&b)?;
        }
        Ok(())
    })
}

fn disconnect_with_many_in_flight(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    let mut bufs = Vec::new();
    for i in 0..256u64 {
        let off = (16 << 20) + (i % 64) * 65536;
        let req = if i % 4 == 3 {
            Request::new(CMD_READ, off, 65536)
        } else {
            Request::new(CMD_WRITE, off, 65536)
        };
        let cookie = c.expect(req);
        let mut b = req.encode(cookie).to_vec();
        if req.kind == CMD_WRITE {
            b.extend_from_slice(&pattern(i, 65536));
        }
        bufs.push(b);
    }
    let sender = send_in_background(c.try_clone_stream()?, bufs);
    thread::sleep(Duration::from_millis(150));
    c.stream().shutdown(Shutdown::Both)?;
    let _ = sender.join();
    drop(c);
    thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn disc_drains_in_flight(ctx: &Ctx) -> Result<()> {
    let mut c = ctx.client()?;
    let base = 24u64 << 20;
    let mut bufs = Vec::new();
    for i in 0..32u64 {
        let req = Request::new(CMD_WRITE, base + i * 65536, 65536);
        let cookie = c.expect(req);
        let mut b = req.encode(cookie).to_vec();
        b.extend_from_slice(&pattern(100 + i, 65536));
        bufs.push(b);
    }
    for _ in 0..16 {
        let req = Request::new(CMD_READ, 40 << 20, 65536);
        let cookie = c.expect(req);
        bufs.push(req.encode(cookie).to_vec());
    }
    bufs.push(Request::new(CMD_DISC, 0, 0).encode(0xD15C).to_vec());
    let expected = c.in_flight();
    let sender = send_in_background(c.try_clone_stream()?, bufs);
    let mut got = 0;
    while got < expected {
        let r = c.recv().with_context(|| {
            format!("after NBD_CMD_DISC only {got} of {expected} in-flight requests were answered")
        })?;
        ensure!(r.error == 0, "in-flight request failed: {}", r.describe_error());
        got += 1;
    }
    sender.join().expect("sender thread")?;
    expect_closed(c.stream(), CLOSE_LIMIT).context("after NBD_CMD_DISC and all replies")?;
    let mut check = ctx.client()?;
    for i in 0..32u64 {
        let back = check.read(base + i * 65536, 65536)?;
        ensure!(back == pattern(100 + i, 65536), "write {i} sent before DISC is not there");
    }
    Ok(())
}

fn out_of_order_replies_match_cookies(ctx: &Ctx) -> Result<()> {
    let base = 32u64 << 20;
    let mut setup = ctx.client()?;
    for i in 0..8u64 {
        setup.write(base + i * (1 << 20), &pattern(200 + i, 1 << 20), 0)?;
    }
    for structured in [true, false] {
        let mut c = if structured { ctx.client()? } else { ctx.simple_client()? };
        let mut bufs = Vec::new();
        let mut expected = std::collections::HashMap::new();
        let mut order = Vec::new();
        let mut rng = Prng::new(42);
        for n in 0..96u64 {
            // Big and small reads mixed, so a server that works concurrently finishes them
            // out of order.
            let region = rng.next_u64() % 8;
            let (off, len) = if n % 6 == 0 {
                (0, 1u32 << 20)
            } else {
                let blk = rng.next_u64() % 256;
                (blk * 4096, 4096)
            };
            let req = Request::new(CMD_READ, base + region * (1 << 20) + off, len);
            let cookie = c.expect(req);
            let full = pattern(200 + region, 1 << 20);
            expected.insert(cookie, full[off as usize..off as usize + len as usize].to_vec());
            order.push(cookie);
            bufs.push(req.encode(cookie).to_vec());
        }
        let sender = send_in_background(c.try_clone_stream()?, bufs);
        let mut seen = Vec::new();
        while !expected.is_empty() {
            let r =
                c.recv().with_context(|| format!("{} replies still missing", expected.len()))?;
            ensure!(r.error == 0, "read failed: {}", r.describe_error());
            let want = expected.remove(&r.cookie).expect("recv checks the cookie is in flight");
            ensure!(r.data == want, "reply for cookie {:#x} carries the wrong data", r.cookie);
            seen.push(r.cookie);
        }
        sender.join().expect("sender thread")?;
        eprintln!(
            "out_of_order ({}): replies {} in request order",
            if structured { "structured" } else { "simple" },
            if seen == order { "came" } else { "did not come" }
        );
        c.check_serves(12 << 20, 13)?;
    }
    Ok(())
}

fn many_connections_at_once(ctx: &Ctx) -> Result<()> {
    let handles: Vec<_> = (0..16u64)
        .map(|i| {
            let (addr, export) = (ctx.addr, ctx.export.clone());
            thread::spawn(move || -> Result<()> {
                let mut c = nbd::connect(addr, &export, i % 2 == 0)?;
                for j in 0..8u64 {
                    c.check_serves((48 << 20) + (i * 8 + j) * 4096, (i * 8 + j) as u8)?;
                }
                c.disconnect()
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread")?;
    }
    Ok(())
}

type Case = (&'static str, fn(&Ctx) -> Result<()>);

const CASES: &[Case] = &[
    ("unknown client flags: server closes", unknown_client_flags),
    ("bad option magic: server closes", bad_option_magic),
    ("garbage after client flags: server closes", garbage_after_client_flags),
    ("unknown option with payload: ERR_UNSUP, then GO works", unknown_option_with_payload),
    ("malformed OPT_GO data: ERR_INVALID, then GO works", go_with_malformed_data),
    ("OPT_GO of an unknown export: ERR_UNKNOWN, then GO works", go_unknown_export),
    ("OPT_EXPORT_NAME of an unknown export: server closes", export_name_unknown_closes),
    ("OPT_EXPORT_NAME of the export: size and flags", export_name_works),
    ("4 GiB option length then EOF: closes, no allocation", huge_option_length),
    ("50 half-open handshakes: others are served", half_open_handshakes),
    ("unknown command: EINVAL, next request works", unknown_command),
    ("unknown command flags: EINVAL, payload consumed", unknown_flags),
    ("FAST_ZERO: EINVAL if not advertised, else OK/ENOTSUP", fast_zero),
    ("DF: EINVAL unless advertised", dont_fragment),
    ("offset+length overflow: EINVAL", offset_length_overflow),
    ("read beyond the end: EINVAL", read_beyond_end),
    ("write beyond the end: ENOSPC, payload consumed", write_beyond_end),
    ("write/trim/zero on a --read-only export: EPERM", read_only_export),
    ("64 MiB read (> max payload): EINVAL or close, no allocation", oversized_read),
    ("4 GiB write header: EINVAL or close, no allocation", oversized_write),
    ("write payload cut short by EOF: no success reply", truncated_write_then_eof),
    ("bad request magic: server closes", bad_request_magic),
    ("disconnect with 256 requests in flight", disconnect_with_many_in_flight),
    ("NBD_CMD_DISC answers all in-flight requests, then closes", disc_drains_in_flight),
    ("96 pipelined reads: replies matched by cookie", out_of_order_replies_match_cookies),
    ("16 connections at once", many_connections_at_once),
];

#[test]
fn hostile_inputs_get_errors_and_the_server_keeps_serving() {
    require_tool("nbdinfo");
    let tmp = tempdir();
    let rw = tmp.path().join("hostile");
    let ro = tmp.path().join("hostile-ro");
    create_volume(&rw, &SIZE.to_string(), &[]);
    create_volume(&ro, &RO_SIZE.to_string(), &[]);
    let rw_config = AgentConfig::new(&rw);
    let ro_config = AgentConfig::new(&ro).read_only();
    let mut agent = rw_config.start(&tmp.path().join("agent.log"));
    let mut ro_agent = ro_config.start(&tmp.path().join("agent-ro.log"));
    let mut ctx = Ctx {
        addr: agent.addr,
        ro_addr: ro_agent.addr,
        export: "hostile".into(),
        ro_export: "hostile-ro".into(),
        agent_pid: agent.pid(),
    };

    let mut failures = Vec::new();
    let mut restarts = 0;
    for (i, (name, case)) in CASES.iter().enumerate() {
        let start = Instant::now();
        let result = case(&ctx).and_then(|()| {
            let mut c = ctx.client().context("a new connection afterwards")?;
            c.check_serves((56 << 20) + i as u64 * 4096, i as u8)
                .context("a new connection afterwards")?;
            c.disconnect()
        });
        let verdict = match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("FAILED: {e:#}"),
        };
        eprintln!("[{:>5} ms] {name}: {verdict}", start.elapsed().as_millis());
        if let Err(e) = result {
            failures.push(format!("{name}: {e:#}"));
        }
        // A crash is a failure of this case; restart so the later cases still say something.
        thread::sleep(Duration::from_millis(20));
        for (which, a, config) in
            [("agent", &mut agent, &rw_config), ("read-only agent", &mut ro_agent, &ro_config)]
        {
            if !a.is_alive() {
                let log = a.log_text();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                failures.push(format!(
                    "{name}: the {which} DIED; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
                restarts += 1;
                *a = config.start(&tmp.path().join(format!("agent-restart-{restarts}.log")));
            }
        }
        ctx.addr = agent.addr;
        ctx.ro_addr = ro_agent.addr;
        ctx.agent_pid = agent.pid();
    }

    agent.assert_alive("after the hostile cases");
    ro_agent.assert_alive("after the hostile cases");
    let info = run(
        Command::new("nbdinfo").arg("--json").arg(agent.uri("hostile")),
        Duration::from_secs(30),
    );
    if !info.success() || !info.stdout.contains(&SIZE.to_string()) {
        failures.push(format!("nbdinfo after the hostile cases:\n{info}"));
    }
    assert!(
        failures.is_empty(),
        "{} hostile case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
