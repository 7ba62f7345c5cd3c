//! A tiny synchronous NBD client over `std::net::TcpStream`, for byte-exact and hostile tests.
//!
//! Constants are from the NBD protocol (NetworkBlockDevice/nbd, doc/proto.md). It speaks fixed
//! newstyle, `NBD_OPT_GO` (with `NBD_INFO_BLOCK_SIZE`), optionally `NBD_OPT_STRUCTURED_REPLY`,
//! and reads simple or structured replies, matching them to requests by cookie. It also exposes
//! the raw pieces ([`Handshake::send_raw`], [`Client::send_raw`]) so tests can send garbage.
//! Every socket has read and write time-outs, so a server that hangs fails the test.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_RESIZE: u16 = 1 << 9;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Time limit of every socket read and write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest reply or option payload this client accepts (a bound, not the server's limit).
const MAX_ACCEPTED: u32 = (64 << 20) + 64;

/// A name for an NBD error value, for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        0 => "OK",
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown",
    }
}

/// Whether an error of this client means "the peer closed (or reset) the connection".
pub fn is_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            )
        })
    })
}

fn connect_stream(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8], what: &str) -> Result<()> {
    s.read_exact(buf).with_context(|| format!("reading {what} ({} bytes)", buf.len()))
}

fn read_u16(s: &mut TcpStream, what: &str) -> Result<u16> {
    let mut b = [0; 2];
    read_exact(s, &mut b, what)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut TcpStream, what: &str) -> Result<u32> {
    let mut b = [0; 4];
    read_exact(s, &mut b, what)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut TcpStream, what: &str) -> Result<u64> {
    let mut b = [0; 8];
    read_exact(s, &mut b, what)?;
    Ok(u64::from_be_bytes(b))
}

/// Waits until the peer closes `s` (EOF or reset), discarding anything it sends; fails if it
/// has not closed within `limit`.
pub fn expect_closed(s: &mut TcpStream, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0u8; 4096];
    let mut discarded = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => discarded += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Ok(())
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("waiting for the server to close"),
        }
        if Instant::now() >= deadline {
            bail!(
                "the server did not close the connection within {limit:?} ({discarded} bytes \
                 received meanwhile)"
            );
        }
    }
}

/// A reply to an option.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_ERR_BIT != 0
    }
}

/// The three block size constraints of `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// The handshake phase: the server's greeting has been read.
#[derive(Debug)]
pub struct Handshake {
    pub stream: TcpStream,
    pub handshake_flags: u16,
}

impl Handshake {
    /// Connects and reads the greeting (NBDMAGIC, IHAVEOPT, handshake flags).
    pub fn start(addr: SocketAddr) -> Result<Handshake> {
        let mut stream = connect_stream(addr)?;
        let magic = read_u64(&mut stream, "greeting magic")?;
        ensure!(magic == NBDMAGIC, "greeting magic {magic:#x}, expected NBDMAGIC");
        let opt = read_u64(&mut stream, "greeting IHAVEOPT")?;
        ensure!(opt == IHAVEOPT, "greeting magic {opt:#x}, expected IHAVEOPT (fixed newstyle)");
        let handshake_flags = read_u16(&mut stream, "handshake flags")?;
        ensure!(
            handshake_flags & FLAG_FIXED_NEWSTYLE != 0,
            "server does not offer fixed newstyle (handshake flags {handshake_flags:#x})"
        );
        Ok(Handshake { stream, handshake_flags })
    }

    /// Starts and sends the usual client flags (fixed newstyle, no zeroes).
    pub fn start_fixed(addr: SocketAddr) -> Result<Handshake> {
        let mut h = Handshake::start(addr)?;
        let mut flags = FLAG_C_FIXED_NEWSTYLE;
        if h.handshake_flags & FLAG_NO_ZEROES != 0 {
            flags |= FLAG_C_NO_ZEROES;
        }
        h.send_client_flags(flags)?;
        Ok(h)
    }

    pub fn send_client_flags(&mut self, flags: u32) -> Result<()> {
        self.send_raw(&flags.to_be_bytes())
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("sending handshake bytes")
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.send_option_header(option, data.len() as u32)?;
        self.send_raw(data)
    }

    /// Sends just an option header announcing `len` bytes of data (for hostile tests).
    pub fn send_option_header(&mut self, option: u32, len: u32) -> Result<()> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send_raw(&b)
    }

    pub fn read_option_reply(&mut self) -> Result<OptReply> {
        let s = &mut self.stream;
        let magic = read_u64(s, "option reply magic")?;
        ensure!(magic == OPT_REPLY_MAGIC, "option reply magic {magic:#x}");
        let option = read_u32(s, "option reply option")?;
        let reply_type = read_u32(s, "option reply type")?;
        let len = read_u32(s, "option reply length")?;
        ensure!(len <= MAX_ACCEPTED, "option reply length {len} is absurd");
        let mut data = vec![0; len as usize];
        read_exact(s, &mut data, "option reply data")?;
        Ok(OptReply { option, reply_type, data })
    }

    /// `NBD_OPT_STRUCTURED_REPLY`; true if the server acknowledged it.
    pub fn structured_reply(&mut self) -> Result<bool> {
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let r = self.read_option_reply()?;
        ensure!(r.option == OPT_STRUCTURED_REPLY, "reply for option {} not 8", r.option);
        Ok(r.reply_type == REP_ACK)
    }

    /// Encodes the data of `NBD_OPT_GO`/`NBD_OPT_INFO` for `name`, asking for block sizes.
    pub fn go_data(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d
    }

    /// Sends `NBD_OPT_GO` for `name` (without structured replies). An error reply comes back
    /// as `Ok(Err((self, reply)))` so the handshake can go on.
    #[allow(clippy::type_complexity)]
    pub fn try_go(mut self, name: &str) -> Result<Result<Client, (Handshake, OptReply)>> {
        Ok(match self.go_inner(name)? {
            Ok(info) => Ok(Client::new(self.stream, info, false)),
            Err(reply) => Err((self, reply)),
        })
    }

    /// Sends `NBD_OPT_GO` and enters transmission; an error reply is an error.
    pub fn go(mut self, name: &str, structured: bool) -> Result<Client> {
        let structured = if structured { self.structured_reply()? } else { false };
        match self.go_inner(name)? {
            Ok(info) => Ok(Client::new(self.stream, info, structured)),
            Err(r) => bail!(
                "NBD_OPT_GO {name:?}: error reply {:#x} ({})",
                r.reply_type,
                String::from_utf8_lossy(&r.data)
            ),
        }
    }

    fn go_inner(&mut self, name: &str) -> Result<Result<ExportInfo, OptReply>> {
        self.send_option(OPT_GO, &Handshake::go_data(name))?;
        let mut info = ExportInfo::default();
        let mut got_export = false;
        loop {
            let r = self.read_option_reply()?;
            ensure!(r.option == OPT_GO, "reply to option {} while waiting for OPT_GO", r.option);
            match r.reply_type {
                REP_ACK => break,
                REP_INFO => {
                    ensure!(r.data.len() >= 2, "NBD_REP_INFO too short");
                    let kind = u16::from_be_bytes([r.data[0], r.data[1]]);
                    let d = &r.data[2..];
                    match kind {
                        INFO_EXPORT => {
                            ensure!(d.len() == 10, "NBD_INFO_EXPORT length {}", d.len());
                            info.size = u64::from_be_bytes(d[..8].try_into().unwrap());
                            info.flags = u16::from_be_bytes([d[8], d[9]]);
                            got_export = true;
                        }
                        INFO_BLOCK_SIZE => {
                            ensure!(d.len() == 12, "NBD_INFO_BLOCK_SIZE length {}", d.len());
                            let u = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                            info.block_sizes =
                                Some(BlockSizes { minimum: u(0), preferred: u(4), maximum: u(8) });
                        }
                        _ => {}
                    }
                }
                t if t & REP_ERR_BIT != 0 => return Ok(Err(r)),
                t => bail!("unexpected reply type {t:#x} to NBD_OPT_GO"),
            }
        }
        ensure!(got_export, "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
        Ok(Ok(info))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct ExportInfo {
    size: u64,
    flags: u16,
    block_sizes: Option<BlockSizes>,
}

/// Connects with fixed newstyle, structured replies (if `structured`) and `NBD_OPT_GO`.
pub fn connect(addr: SocketAddr, export: &str, structured: bool) -> Result<Client> {
    Handshake::start_fixed(addr)?.go(export, structured)
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn new(kind: u16, offset: u64, length: u32) -> Request {
        Request { flags: 0, kind, offset, length }
    }

    pub fn flags(mut self, flags: u16) -> Request {
        self.flags = flags;
        self
    }

    pub fn encode(&self, cookie: u64) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A complete reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success, else an NBD error value.
    pub error: u32,
    /// For a successful read: the data (holes filled with zeroes).
    pub data: Vec<u8>,
    pub structured: bool,
    /// The error message of a structured error chunk, if any.
    pub message: Option<String>,
}

impl Reply {
    pub fn describe_error(&self) -> String {
        format!("{} ({})", self.error, errno_name(self.error))
    }
}

#[derive(Debug)]
struct Pending {
    request: Request,
    partial: Option<Reply>,
}

/// The transmission phase.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub block_sizes: Option<BlockSizes>,
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
}

impl Client {
    fn new(stream: TcpStream, info: ExportInfo, structured: bool) -> Client {
        Client {
            stream,
            size: info.size,
            flags: info.flags,
            structured,
            block_sizes: info.block_sizes,
            pending: HashMap::new(),
            next_cookie: 0x1000,
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// A second handle on the socket, e.g. to send from another thread.
    pub fn try_clone_stream(&self) -> Result<TcpStream> {
        Ok(self.stream.try_clone()?)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Allocates a cookie and records `request` as in flight, without sending anything (the
    /// caller sends `request.encode(cookie)` itself, e.g. from another thread).
    pub fn expect(&mut self, request: Request) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.pending.insert(cookie, Pending { request, partial: None });
        cookie
    }

    /// Sends a request (and its payload, which must be `request.length` bytes for a write).
    pub fn send(&mut self, request: Request, payload: &[u8]) -> Result<u64> {
        let cookie = self.expect(request);
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&request.encode(cookie));
        b.extend_from_slice(payload);
        self.stream.write_all(&b).context("sending a request")?;
        Ok(cookie)
    }

    /// Sends raw bytes in the transmission phase.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("sending raw bytes")
    }

    /// Reads until some request's reply is complete, and returns it.
    pub fn recv(&mut self) -> Result<Reply> {
        loop {
            if let Some(r) = self.recv_part()? {
                return Ok(r);
            }
        }
    }

    /// Sends `request` and waits for its reply (no other requests may be in flight).
    pub fn call(&mut self, request: Request, payload: &[u8]) -> Result<Reply> {
        let cookie = self.send(request, payload)?;
        let r = self.recv()?;
        ensure!(r.cookie == cookie, "reply for cookie {:#x}, expected {cookie:#x}", r.cookie);
        Ok(r)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        let r = self.call(Request::new(CMD_READ, offset, len), &[])?;
        ensure!(r.error == 0, "read {offset}+{len}: error {}", r.describe_error());
        Ok(r.data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<()> {
        let req = Request::new(CMD_WRITE, offset, data.len() as u32).flags(flags);
        let r = self.call(req, data)?;
        ensure!(r.error == 0, "write {offset}+{}: error {}", data.len(), r.describe_error());
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        let r = self.call(Request::new(CMD_FLUSH, 0, 0), &[])?;
        ensure!(r.error == 0, "flush: error {}", r.describe_error());
        Ok(())
    }

    /// Sends `NBD_CMD_DISC` (no reply) and shuts down our side for writing.
    pub fn disconnect(&mut self) -> Result<()> {
        self.send_raw(&Request::new(CMD_DISC, 0, 0).encode(0xD15C))?;
        let _ = self.stream.shutdown(Shutdown::Write);
        Ok(())
    }

    /// A quick proof that the connection serves: write a block, read it back.
    pub fn check_serves(&mut self, offset: u64, seed: u8) -> Result<()> {
        let data: Vec<u8> =
            (0..4096u32).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
        if self.flags & TF_READ_ONLY == 0 {
            self.write(offset, &data, 0).context("check write")?;
            let back = self.read(offset, 4096).context("check read")?;
            ensure!(back == data, "read back differs from what was written at {offset}");
        } else {
            self.read(offset, 4096).context("check read")?;
        }
        Ok(())
    }

    fn take_pending(&mut self, cookie: u64) -> Result<Pending> {
        self.pending.remove(&cookie).ok_or_else(|| {
            anyhow!("the server replied with cookie {cookie:#x}, which is not in flight")
        })
    }

    fn recv_part(&mut self) -> Result<Option<Reply>> {
        let magic = read_u32(&mut self.stream, "reply magic")?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = read_u32(&mut self.stream, "simple reply error")?;
                let cookie = read_u64(&mut self.stream, "simple reply cookie")?;
                let p = self.take_pending(cookie)?;
                ensure!(p.partial.is_none(), "simple reply after structured chunks ({cookie:#x})");
                let mut data = Vec::new();
                if p.request.kind == CMD_READ && error == 0 {
                    ensure!(
                        !self.structured,
                        "simple reply to a read after structured replies were negotiated"
                    );
                    data = vec![0; p.request.length as usize];
                    read_exact(&mut self.stream, &mut data, "simple read reply data")?;
                }
                Ok(Some(Reply { cookie, error, data, structured: false, message: None }))
            }
            STRUCTURED_REPLY_MAGIC => {
                ensure!(self.structured, "structured reply chunk without negotiation");
                let flags = read_u16(&mut self.stream, "chunk flags")?;
                let kind = read_u16(&mut self.stream, "chunk type")?;
                let cookie = read_u64(&mut self.stream, "chunk cookie")?;
                let len = read_u32(&mut self.stream, "chunk length")?;
                ensure!(len <= MAX_ACCEPTED, "chunk length {len} is absurd");
                let mut payload = vec![0; len as usize];
                read_exact(&mut self.stream, &mut payload, "chunk payload")?;
                let p = self
                    .pending
                    .get_mut(&cookie)
                    .ok_or_else(|| anyhow!("chunk for cookie {cookie:#x}, not in flight"))?;
                let req = p.request;
                let reply = p.partial.get_or_insert_with(|| Reply {
                    cookie,
                    error: 0,
                    data: if req.kind == CMD_READ { vec![0; req.length as usize] } else { vec![] },
                    structured: true,
                    message: None,
                });
                apply_chunk(reply, &req, kind, &payload)
                    .with_context(|| format!("chunk type {kind} for cookie {cookie:#x}"))?;
                if flags & REPLY_FLAG_DONE != 0 {
                    let p = self.take_pending(cookie)?;
                    Ok(p.partial)
                } else {
                    Ok(None)
                }
            }
            m => bail!("bad reply magic {m:#010x}"),
        }
    }
}

fn apply_chunk(reply: &mut Reply, req: &Request, kind: u16, payload: &[u8]) -> Result<()> {
    let in_range =
        |off: u64, len: u64| off >= req.offset && off + len <= req.offset + u64::from(req.length);
    match kind {
        REPLY_TYPE_NONE => ensure!(payload.is_empty(), "NONE chunk with payload"),
        REPLY_TYPE_OFFSET_DATA => {
            ensure!(req.kind == CMD_READ && payload.len() >= 8, "bad OFFSET_DATA");
            let off = u64::from_be_bytes(payload[..8].try_into().unwrap());
            let data = &payload[8..];
            ensure!(in_range(off, data.len() as u64), "OFFSET_DATA outside the request");
            if reply.error != 0 {
                return Ok(()); // data after an error chunk: not valid, ignored
            }
            let start = (off - req.offset) as usize;
            reply.data[start..start + data.len()].copy_from_slice(data);
        }
        REPLY_TYPE_OFFSET_HOLE => {
            ensure!(req.kind == CMD_READ && payload.len() == 12, "bad OFFSET_HOLE");
            let off = u64::from_be_bytes(payload[..8].try_into().unwrap());
            let len = u32::from_be_bytes(payload[8..12].try_into().unwrap());
            ensure!(in_range(off, u64::from(len)), "OFFSET_HOLE outside the request");
            if reply.error != 0 {
                return Ok(());
            }
            let start = (off - req.offset) as usize;
            reply.data[start..start + len as usize].fill(0);
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            ensure!(payload.len() >= 6, "error chunk too short");
            let error = u32::from_be_bytes(payload[..4].try_into().unwrap());
            ensure!(error != 0, "error chunk with error 0");
            let mlen = u16::from_be_bytes([payload[4], payload[5]]) as usize;
            ensure!(6 + mlen <= payload.len(), "error message longer than the chunk");
            reply.error = error;
            reply.message = Some(String::from_utf8_lossy(&payload[6..6 + mlen]).into_owned());
            reply.data.clear();
        }
        k if k & (1 << 15) != 0 => reply.error = EIO,
        k => bail!("unknown chunk type {k}"),
    }
    Ok(())
}
