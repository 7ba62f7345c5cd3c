//! The server side of the fixed newstyle handshake as a sans-IO state machine.
//!
//! ```text
//! driver                               ServerHandshake
//!   new(catalog, config)  ──────────►  queues the 18-byte greeting
//!   take_output()         ◄──────────  bytes to send
//!   handle_input(&mut buf) ─────────►  consumes whole options from buf, queues replies,
//!                         ◄──────────  Ok(None): need more input | Ok(Some(event)) | Err(close)
//! ```
//! Events: [`HandshakeEvent::StartTls`] (send the output, run the TLS handshake on the
//! socket, call [`ServerHandshake::tls_established`], go on), [`HandshakeEvent::Ready`]
//! (send the output; transmission starts; bytes left in the buffer are the first requests)
//! and [`HandshakeEvent::Abort`] (send the output, close). An `Err` means "close the
//! connection after sending the output": bad magic, unknown client flags, an
//! `NBD_OPT_EXPORT_NAME` that cannot be satisfied (the spec gives no way to refuse it), or an
//! option too long even to skip.
//!
//! Option payloads are buffered only up to [`MAX_OPTION_LEN`]; longer ones and unknown
//! options are skipped as they arrive without being stored.

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

use super::consts::*;

/// TLS policy, server-wide or per export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS.
    #[default]
    Off,
    /// TLS at the client's choice.
    Optional,
    /// TLS before anything else.
    Required,
}

/// What the handshake needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDesc {
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (empty: none).
    pub description: String,
    pub size: u64,
    /// Transmission flags the server supports for this export; `HAS_FLAGS` (and `READ_ONLY`
    /// when `read_only`) are added by the handshake.
    pub flags: u16,
    pub read_only: bool,
    /// Minimum block size advertised: 1 for page-cache exports, 512 for O_DIRECT exports.
    pub min_block_size: u32,
    /// The client must have started TLS before it may use this export.
    pub tls_required: bool,
    /// Metadata contexts the export always offers (`base:allocation`). Contexts that come and
    /// go at run time (`qemu:dirty-bitmap:NAME`) are added by
    /// [`ExportCatalog::meta_contexts`].
    pub meta_contexts: Vec<String>,
}

impl ExportDesc {
    /// The transmission flags sent to the client.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = self.flags | FLAG_HAS_FLAGS;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        flags
    }

    /// (minimum, preferred, maximum) block sizes.
    pub fn block_sizes(&self) -> BlockSizes {
        let min = self.min_block_size.clamp(1, PREFERRED_BLOCK_SIZE);
        BlockSizes { min, preferred: PREFERRED_BLOCK_SIZE, max: MAX_PAYLOAD }
    }
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// Where the handshake looks exports up.
pub trait ExportCatalog {
    fn exports(&self) -> &[ExportDesc];

    /// The export called `name`; the empty name is the default export, which exists when
    /// there is exactly one export.
    fn lookup(&self, name: &str) -> Option<usize> {
        let exports = self.exports();
        if name.is_empty() && exports.len() == 1 {
            return Some(0);
        }
        exports.iter().position(|e| e.name == name)
    }

    /// The metadata contexts export `export` (an index from [`ExportCatalog::lookup`]) offers
    /// now, in the order `NBD_OPT_LIST_META_CONTEXT` lists them. Asked afresh at every
    /// LIST/SET, so a catalog whose contexts change at run time (dirty bitmaps created and
    /// removed) answers from its current state; the handshake itself stays free of I/O and
    /// clocks. Default: the export's static [`ExportDesc::meta_contexts`].
    fn meta_contexts(&self, export: usize) -> Vec<String> {
        self.exports()[export].meta_contexts.clone()
    }
}

impl ExportCatalog for [ExportDesc] {
    fn exports(&self) -> &[ExportDesc] {
        self
    }
}

impl ExportCatalog for Vec<ExportDesc> {
    fn exports(&self) -> &[ExportDesc] {
        self
    }
}

impl<T: ExportCatalog + ?Sized> ExportCatalog for std::sync::Arc<T> {
    fn exports(&self) -> &[ExportDesc] {
        (**self).exports()
    }

    fn lookup(&self, name: &str) -> Option<usize> {
        (**self).lookup(name)
    }

    fn meta_contexts(&self, export: usize) -> Vec<String> {
        (**self).meta_contexts(export)
    }
}

impl<T: ExportCatalog + ?Sized> ExportCatalog for &T {
    fn exports(&self) -> &[ExportDesc] {
        (**self).exports()
    }

    fn lookup(&self, name: &str) -> Option<usize> {
        (**self).lookup(name)
    }

    fn meta_contexts(&self, export: usize) -> Vec<String> {
        (**self).meta_contexts(export)
    }
}

/// Connection-wide settings of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandshakeConfig {
    /// The server can run TLS (has a certificate): `NBD_OPT_STARTTLS` is accepted.
    pub tls_available: bool,
    /// FORCEDTLS: every option but STARTTLS and ABORT is refused with `NBD_REP_ERR_TLS_REQD`
    /// until TLS runs.
    pub tls_required: bool,
}

/// A selected metadata context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the export in the catalog.
    pub export: usize,
    pub name: String,
    pub size: u64,
    pub transmission_flags: u16,
    pub structured_replies: bool,
    pub meta_contexts: Vec<MetaContext>,
    pub block_sizes: BlockSizes,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`, so it promised to honour the
    /// constraints; the server may then refuse misaligned requests.
    pub block_size_negotiated: bool,
    pub no_zeroes: bool,
    pub tls: bool,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeEvent {
    /// Send the output (the ACK), then run a TLS server handshake on the socket, then call
    /// [`ServerHandshake::tls_established`] and go on reading (through TLS).
    StartTls,
    /// Send the output; the transmission phase starts.
    Ready(Negotiated),
    /// The client aborted: send the output and close.
    Abort,
}

/// Why the connection must be closed (after sending whatever output is queued).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("bad option magic {found:#018x}: not an NBD client, or a corrupt stream")]
    BadMagic { found: u64 },
    #[error("client flags {flags:#x} include unknown bits")]
    BadClientFlags { flags: u32 },
    #[error("NBD_OPT_EXPORT_NAME for unknown export {name:?}")]
    UnknownExport { name: String },
    #[error("NBD_OPT_EXPORT_NAME: the export name is not valid UTF-8 or too long")]
    BadExportName,
    #[error("export {name:?} requires TLS but the client did not start it")]
    TlsRequired { name: String },
    #[error("option {option} has {len} bytes of data, more than the {MAX_OPTION_DISCARD} we skip")]
    OptionTooLong { option: u32, len: u32 },
    #[error("the handshake is over")]
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    /// Skipping an option's payload; then `reply` (an error) is sent for `option`.
    Discard {
        option: u32,
        remaining: u32,
        reply: u32,
    },
    AwaitTls,
    Done,
}

/// The server side of one connection's handshake.
#[derive(Debug)]
pub struct ServerHandshake<C> {
    catalog: C,
    config: HandshakeConfig,
    state: State,
    out: BytesMut,
    no_zeroes: bool,
    tls: bool,
    structured: bool,
    /// Contexts chosen by the last SET_META_CONTEXT: (export index, contexts).
    meta: Option<(usize, Vec<MetaContext>)>,
    /// Context names by id - 1: a name gets the next id the first time a SET selects it and
    /// keeps it for the whole connection, so ids stay stable while the export's list of
    /// contexts changes (bitmaps created and removed between two SETs) and an id never
    /// names two contexts.
    context_ids: Vec<String>,
}

fn is_known_option(option: u32) -> bool {
    matches!(
        option,
        OPT_EXPORT_NAME
            | OPT_ABORT
            | OPT_LIST
            | OPT_STARTTLS
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
    )
}

/// Reads a u32-length-prefixed string of at most [`MAX_STRING_LEN`] bytes.
fn get_string(p: &mut &[u8]) -> Option<String> {
    if p.remaining() < 4 {
        return None;
    }
    let len = p.get_u32() as usize;
    if len > MAX_STRING_LEN || p.remaining() < len {
        return None;
    }
    let s = std::str::from_utf8(&p[..len]).ok()?.to_string();
    p.advance(len);
    Some(s)
}

impl<C: ExportCatalog> ServerHandshake<C> {
    /// A new handshake; the greeting is queued as output.
    pub fn new(catalog: C, config: HandshakeConfig) -> Self {
        let mut out = BytesMut::with_capacity(256);
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        ServerHandshake {
            catalog,
            config,
            state: State::ClientFlags,
            out,
            no_zeroes: false,
            tls: false,
            structured: false,
            meta: None,
            context_ids: Vec::new(),
        }
    }

    /// Bytes to send now (may be empty).
    pub fn take_output(&mut self) -> BytesMut {
        self.out.split()
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Whether TLS is running on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls
    }

    /// Tells the machine the TLS handshake succeeded after [`HandshakeEvent::StartTls`].
    /// Everything negotiated before TLS is forgotten, as the spec requires.
    pub fn tls_established(&mut self) {
        if self.state == State::AwaitTls {
            self.state = State::Options;
            self.tls = true;
            self.structured = false;
            self.meta = None;
        }
    }

    /// The catalog (so the driver can map [`Negotiated::export`] back).
    pub fn catalog(&self) -> &C {
        &self.catalog
    }

    /// Consumes as much of `input` as forms whole messages. Stops at an event, leaving the
    /// bytes after it in `input` (after `Ready` they are the first transmission requests).
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
    ) -> Result<Option<HandshakeEvent>, HandshakeError> {
        loop {
            match self.state {
                State::Done => return Err(HandshakeError::Finished),
                State::AwaitTls => return Ok(None),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(None);
                    }
                    let flags = input.get_u32();
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        self.state = State::Done;
                        return Err(HandshakeError::BadClientFlags { flags });
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Discard { option, remaining, reply } => {
                    let n = (remaining as usize).min(input.len());
                    input.advance(n);
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.state = State::Discard { option, remaining, reply };
                        return Ok(None);
                    }
                    self.state = State::Options;
                    let msg = if reply == REP_ERR_TOO_BIG {
                        "option data too long"
                    } else {
                        "unknown option"
                    };
                    self.reply(option, reply, msg.as_bytes());
                }
                State::Options => {
                    if input.len() < OPTION_HEADER_LEN {
                        return Ok(None);
                    }
                    let mut hdr = &input[..OPTION_HEADER_LEN];
                    let magic = hdr.get_u64();
                    let option = hdr.get_u32();
                    let len = hdr.get_u32();
                    if magic != IHAVEOPT {
                        self.state = State::Done;
                        return Err(HandshakeError::BadMagic { found: magic });
                    }
                    let known = is_known_option(option);
                    if !known || len > MAX_OPTION_LEN {
                        if len > MAX_OPTION_DISCARD || (option == OPT_EXPORT_NAME) {
                            self.state = State::Done;
                            return Err(HandshakeError::OptionTooLong { option, len });
                        }
                        input.advance(OPTION_HEADER_LEN);
                        let reply = if known { REP_ERR_TOO_BIG } else { REP_ERR_UNSUP };
                        self.state = State::Discard { option, remaining: len, reply };
                        continue;
                    }
                    let total = OPTION_HEADER_LEN + len as usize;
                    if input.len() < total {
                        input.reserve(total - input.len());
                        return Ok(None);
                    }
                    input.advance(OPTION_HEADER_LEN);
                    let payload = input.split_to(len as usize);
                    if let Some(event) = self.option(option, &payload)? {
                        return Ok(Some(event));
                    }
                }
            }
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out.put_u64(REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(kind);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn error(&mut self, option: u32, kind: u32, msg: &str) {
        self.reply(option, kind, msg.as_bytes());
    }

    fn ack(&mut self, option: u32) {
        self.reply(option, REP_ACK, &[]);
    }

    fn negotiated(&self, export: usize, block_size_negotiated: bool) -> Negotiated {
        let desc = &self.catalog.exports()[export];
        let meta_contexts = match &self.meta {
            Some((e, contexts)) if *e == export && self.structured => contexts.clone(),
            _ => Vec::new(),
        };
        Negotiated {
            export,
            name: desc.name.clone(),
            size: desc.size,
            transmission_flags: desc.transmission_flags(),
            structured_replies: self.structured,
            meta_contexts,
            block_sizes: desc.block_sizes(),
            block_size_negotiated,
            no_zeroes: self.no_zeroes,
            tls: self.tls,
        }
    }

    fn option(
        &mut self,
        option: u32,
        payload: &[u8],
    ) -> Result<Option<HandshakeEvent>, HandshakeError> {
        if self.config.tls_required && !self.tls && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                self.state = State::Done;
                let name = String::from_utf8_lossy(payload).into_owned();
                return Err(HandshakeError::TlsRequired { name });
            }
            self.error(option, REP_ERR_TLS_REQD, "this server requires TLS: use NBD_OPT_STARTTLS");
            return Ok(None);
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(payload).map(Some),
            OPT_ABORT => {
                self.ack(option);
                self.state = State::Done;
                Ok(Some(HandshakeEvent::Abort))
            }
            OPT_LIST => {
                if !payload.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(None);
                }
                let mut data = Vec::new();
                for i in 0..self.catalog.exports().len() {
                    let e = &self.catalog.exports()[i];
                    data.clear();
                    data.put_u32(e.name.len() as u32);
                    data.put_slice(e.name.as_bytes());
                    data.put_slice(e.description.as_bytes());
                    self.reply(option, REP_SERVER, &data);
                }
                self.ack(option);
                Ok(None)
            }
            OPT_STARTTLS => {
                if !payload.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                } else if self.tls {
                    self.error(option, REP_ERR_INVALID, "TLS is already running");
                } else if !self.config.tls_available {
                    self.error(option, REP_ERR_POLICY, "TLS is not configured on this server");
                } else {
                    self.ack(option);
                    self.state = State::AwaitTls;
                    return Ok(Some(HandshakeEvent::StartTls));
                }
                Ok(None)
            }
            OPT_INFO | OPT_GO => Ok(self.info_or_go(option, payload)),
            OPT_STRUCTURED_REPLY => {
                if payload.is_empty() {
                    self.structured = true;
                    self.ack(option);
                } else {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, payload);
                Ok(None)
            }
            // is_known_option() kept unknown options out of here.
            _ => {
                self.error(option, REP_ERR_UNSUP, "unknown option");
                Ok(None)
            }
        }
    }

    fn export_name(&mut self, payload: &[u8]) -> Result<HandshakeEvent, HandshakeError> {
        self.state = State::Done;
        if payload.len() > MAX_STRING_LEN {
            return Err(HandshakeError::BadExportName);
        }
        let name = std::str::from_utf8(payload).map_err(|_| HandshakeError::BadExportName)?;
        let Some(export) = self.catalog.lookup(name) else {
            return Err(HandshakeError::UnknownExport { name: name.to_string() });
        };
        let desc = &self.catalog.exports()[export];
        if desc.tls_required && !self.tls {
            return Err(HandshakeError::TlsRequired { name: name.to_string() });
        }
        let (size, flags) = (desc.size, desc.transmission_flags());
        self.out.put_u64(size);
        self.out.put_u16(flags);
        if !self.no_zeroes {
            self.out.put_bytes(0, 124);
        }
        Ok(HandshakeEvent::Ready(self.negotiated(export, false)))
    }

    fn info_or_go(&mut self, option: u32, payload: &[u8]) -> Option<HandshakeEvent> {
        let mut p = payload;
        let Some(name) = get_string(&mut p) else {
            self.error(option, REP_ERR_INVALID, "malformed export name");
            return None;
        };
        if p.remaining() < 2 {
            self.error(option, REP_ERR_INVALID, "missing number of information requests");
            return None;
        }
        let n = p.get_u16() as usize;
        if p.remaining() != 2 * n {
            self.error(option, REP_ERR_INVALID, "information request count does not match length");
            return None;
        }
        let requests: Vec<u16> = (0..n).map(|_| p.get_u16()).collect();
        let Some(export) = self.catalog.lookup(&name) else {
            let msg = format!("no export named {name:?}");
            self.error(option, REP_ERR_UNKNOWN, &msg);
            return None;
        };
        let desc = self.catalog.exports()[export].clone();
        if desc.tls_required && !self.tls {
            self.error(option, REP_ERR_TLS_REQD, "this export requires TLS: use NBD_OPT_STARTTLS");
            return None;
        }
        let mut data = Vec::with_capacity(64);
        data.put_u16(INFO_EXPORT);
        data.put_u64(desc.size);
        data.put_u16(desc.transmission_flags());
        self.reply(option, REP_INFO, &data);
        let mut block_size_requested = false;
        for r in requests {
            data.clear();
            match r {
                INFO_NAME => {
                    data.put_u16(INFO_NAME);
                    data.put_slice(desc.name.as_bytes());
                }
                INFO_DESCRIPTION if !desc.description.is_empty() => {
                    data.put_u16(INFO_DESCRIPTION);
                    data.put_slice(desc.description.as_bytes());
                }
                INFO_BLOCK_SIZE => block_size_requested = true,
                _ => {}
            }
            if !data.is_empty() {
                self.reply(option, REP_INFO, &data);
            }
        }
        // Sent even when not asked for (the spec allows it); a client that did not ask is
        // still served at any alignment.
        let bs = desc.block_sizes();
        data.clear();
        data.put_u16(INFO_BLOCK_SIZE);
        data.put_u32(bs.min);
        data.put_u32(bs.preferred);
        data.put_u32(bs.max);
        self.reply(option, REP_INFO, &data);
        self.ack(option);
        if option == OPT_GO {
            self.state = State::Done;
            return Some(HandshakeEvent::Ready(self.negotiated(export, block_size_requested)));
        }
        None
    }

    /// The id of context `name` on this connection (assigned on first use).
    fn context_id(&mut self, name: &str) -> u32 {
        let i = match self.context_ids.iter().position(|n| n == name) {
            Some(i) => i,
            None => {
                self.context_ids.push(name.to_string());
                self.context_ids.len() - 1
            }
        };
        // The table holds only names the catalog offered and a SET selected: it grows with the
        // bitmaps created during the handshake, not with what the client sends.
        i as u32 + 1
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    ///
    /// LIST: no query lists every context of the export; a query ending in `:` (`base:`,
    /// `qemu:`, `qemu:dirty-bitmap:`) lists the contexts it is a prefix of; any other query
    /// lists the context of that exact name. SET selects exact names only: wildcards and
    /// unknown names select nothing (the spec: the server MUST ignore unknown leaf names and
    /// SHOULD NOT let an empty leaf name select). Replies follow the export's order.
    fn meta_context(&mut self, option: u32, payload: &[u8]) {
        let list = option == OPT_LIST_META_CONTEXT;
        if !list {
            // A SET replaces the previous selection even when it fails (spec).
            self.meta = None;
        }
        if !self.structured {
            self.error(option, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first");
            return;
        }
        let mut p = payload;
        let Some(name) = get_string(&mut p) else {
            self.error(option, REP_ERR_INVALID, "malformed export name");
            return;
        };
        if p.remaining() < 4 {
            self.error(option, REP_ERR_INVALID, "missing number of queries");
            return;
        }
        let count = p.get_u32();
        let mut queries = Vec::new();
        for _ in 0..count {
            let Some(q) = get_string(&mut p) else {
                self.error(option, REP_ERR_INVALID, "malformed query");
                return;
            };
            queries.push(q);
        }
        if p.has_remaining() {
            self.error(option, REP_ERR_INVALID, "trailing bytes after the queries");
            return;
        }
        let Some(export) = self.catalog.lookup(&name) else {
            let msg = format!("no export named {name:?}");
            self.error(option, REP_ERR_UNKNOWN, &msg);
            return;
        };
        if self.catalog.exports()[export].tls_required && !self.tls {
            self.error(option, REP_ERR_TLS_REQD, "this export requires TLS: use NBD_OPT_STARTTLS");
            return;
        }
        let wanted = |ctx: &str| {
            if queries.is_empty() {
                return list; // LIST with no query lists all; SET with no query selects none
            }
            queries.iter().any(|q| q == ctx || (list && q.ends_with(':') && ctx.starts_with(q)))
        };
        let names: Vec<String> =
            self.catalog.meta_contexts(export).into_iter().filter(|c| wanted(c)).collect();
        let mut chosen: Vec<MetaContext> = Vec::with_capacity(names.len());
        let mut data = Vec::with_capacity(64);
        for name in names {
            // LIST replies carry id 0 (the spec: reserved, SHOULD be zero).
            let id = if list { 0 } else { self.context_id(&name) };
            data.clear();
            data.put_u32(id);
            data.put_slice(name.as_bytes());
            self.reply(option, REP_META_CONTEXT, &data);
            if !list {
                chosen.push(MetaContext { id, name });
            }
        }
        if !list {
            self.meta = Some((export, chosen));
        }
        self.ack(option);
    }
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
