//! The transmission phase: request headers in, replies out, and the checks every request
//! passes before it reaches a disk.
//!
//! Decoding is split from validation so the driver always knows how many payload bytes
//! follow a header (a WRITE's `length`), even when the request is refused:
//! [`RequestHeader::decode`] -> [`validate`] -> [`payload_action`].

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

use super::consts::*;

/// A request header as it came off the wire (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// The stream cannot be decoded any further: close the connection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("bad request magic {found:#010x}: the stream is corrupt or not NBD")]
    BadMagic { found: u32 },
}

impl RequestHeader {
    /// Decodes one header from the front of `buf`; `Ok(None)` if fewer than 28 bytes are
    /// there (nothing is consumed). A bad magic consumes nothing either.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<RequestHeader>, DecodeError> {
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let mut b = &buf[..REQUEST_HEADER_LEN];
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let hdr = RequestHeader {
            flags: b.get_u16(),
            kind: b.get_u16(),
            cookie: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u32(),
        };
        buf.advance(REQUEST_HEADER_LEN);
        Ok(Some(hdr))
    }

    /// Encodes the header (what a client sends).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// Payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A validated command with its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write { fua: bool },
    Disc,
    Flush,
    Trim { fua: bool },
    Cache,
    WriteZeroes { fua: bool, no_hole: bool, fast: bool },
    BlockStatus { req_one: bool },
}

impl Command {
    pub fn name(&self) -> &'static str {
        command_name(match self {
            Command::Read => CMD_READ,
            Command::Write { .. } => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim { .. } => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes { .. } => CMD_WRITE_ZEROES,
            Command::BlockStatus { .. } => CMD_BLOCK_STATUS,
        })
    }
}

fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// A request that passed [`validate`]: in range, allowed, aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
    pub command: Command,
}

/// What the transmission phase of one connection allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionParams {
    pub size: u64,
    pub transmission_flags: u16,
    pub structured_replies: bool,
    /// Number of metadata contexts selected (BLOCK_STATUS needs at least one).
    pub meta_contexts: usize,
    /// Alignment enforced on offsets and lengths, when the client negotiated block sizes.
    pub min_block_size: Option<u32>,
    /// Largest READ or WRITE.
    pub max_payload: u32,
}

/// A request refused with an error reply; the connection goes on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("unknown command type {kind}")]
    UnknownCommand { kind: u16 },
    #[error("flags {flags:#x} are not valid for {command}")]
    BadFlags { command: &'static str, flags: u16 },
    #[error("{command} was not advertised to this client")]
    NotAdvertised { command: &'static str },
    #[error("{command} on a read-only export")]
    ReadOnly { command: &'static str },
    #[error("{command} of {length} bytes is longer than the maximum {max}")]
    TooLarge { command: &'static str, length: u32, max: u32 },
    #[error("{command} at offset {offset} length {length} ends beyond the export size {size}")]
    BeyondEnd { command: &'static str, offset: u64, length: u32, size: u64 },
    #[error("{command} at offset {offset} length {length} is not aligned to {align} bytes")]
    Misaligned { command: &'static str, offset: u64, length: u32, align: u32 },
    #[error("BLOCK_STATUS needs structured replies and a selected metadata context")]
    NoMetaContext,
    #[error("BLOCK_STATUS of length 0")]
    EmptyBlockStatus,
}

impl RequestError {
    /// The NBD error value of the reply.
    pub fn errno(&self) -> u32 {
        match self {
            RequestError::ReadOnly { .. } => errno::EPERM,
            RequestError::BeyondEnd { command, .. }
                if *command == "WRITE" || *command == "WRITE_ZEROES" =>
            {
                errno::ENOSPC
            }
            _ => errno::EINVAL,
        }
    }
}

/// Classifies a request header. Checks, in order: known command, flags valid for it,
/// command advertised, read-only, maximum payload, range (with overflow), alignment.
pub fn validate(hdr: &RequestHeader, p: &TransmissionParams) -> Result<Request, RequestError> {
    let tf = p.transmission_flags;
    let command = command_name(hdr.kind);
    if command == "unknown" {
        return Err(RequestError::UnknownCommand { kind: hdr.kind });
    }
    let mut allowed = 0;
    if tf & FLAG_SEND_FUA != 0 {
        allowed |= CMD_FLAG_FUA; // valid on every command once advertised (spec)
    }
    match hdr.kind {
        CMD_WRITE_ZEROES => {
            allowed |= CMD_FLAG_NO_HOLE;
            if tf & FLAG_SEND_FAST_ZERO != 0 {
                allowed |= CMD_FLAG_FAST_ZERO;
            }
        }
        CMD_READ if tf & FLAG_SEND_DF != 0 => allowed |= CMD_FLAG_DF,
        CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if hdr.flags & !allowed != 0 {
        return Err(RequestError::BadFlags { command, flags: hdr.flags });
    }
    let fua = hdr.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(hdr.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && tf & FLAG_READ_ONLY != 0 {
        return Err(RequestError::ReadOnly { command });
    }
    let advertised = match hdr.kind {
        CMD_FLUSH => tf & FLAG_SEND_FLUSH != 0,
        CMD_TRIM => tf & FLAG_SEND_TRIM != 0,
        CMD_CACHE => tf & FLAG_SEND_CACHE != 0,
        CMD_WRITE_ZEROES => tf & FLAG_SEND_WRITE_ZEROES != 0,
        _ => true,
    };
    if !advertised {
        return Err(RequestError::NotAdvertised { command });
    }
    let cmd = match hdr.kind {
        CMD_READ => Command::Read,
        CMD_WRITE => Command::Write { fua },
        // DISC and FLUSH carry no range (offset and length are reserved): they are ignored and
        // the request says 0/0, so every valid `Request` has an in-range offset + length.
        CMD_DISC => return Ok(Request { offset: 0, length: 0, ..request(hdr, Command::Disc) }),
        CMD_FLUSH => return Ok(Request { offset: 0, length: 0, ..request(hdr, Command::Flush) }),
        CMD_TRIM => Command::Trim { fua },
        CMD_CACHE => Command::Cache,
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            fua,
            no_hole: hdr.flags & CMD_FLAG_NO_HOLE != 0,
            fast: hdr.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        _ => {
            if !p.structured_replies || p.meta_contexts == 0 {
                return Err(RequestError::NoMetaContext);
            }
            if hdr.length == 0 {
                return Err(RequestError::EmptyBlockStatus);
            }
            Command::BlockStatus { req_one: hdr.flags & CMD_FLAG_REQ_ONE != 0 }
        }
    };
    if matches!(hdr.kind, CMD_READ | CMD_WRITE) && hdr.length > p.max_payload {
        return Err(RequestError::TooLarge { command, length: hdr.length, max: p.max_payload });
    }
    let in_range = hdr.offset.checked_add(u64::from(hdr.length)).is_some_and(|end| end <= p.size);
    if !in_range {
        return Err(RequestError::BeyondEnd {
            command,
            offset: hdr.offset,
            length: hdr.length,
            size: p.size,
        });
    }
    if let Some(align) = p.min_block_size.filter(|a| *a > 1) {
        if !hdr.offset.is_multiple_of(u64::from(align)) || !hdr.length.is_multiple_of(align) {
            return Err(RequestError::Misaligned {
                command,
                offset: hdr.offset,
                length: hdr.length,
                align,
            });
        }
    }
    Ok(request(hdr, cmd))
}

fn request(hdr: &RequestHeader, command: Command) -> Request {
    Request { cookie: hdr.cookie, offset: hdr.offset, length: hdr.length, command }
}

/// Longest WRITE payload that is skipped (read and dropped) to answer an invalid WRITE with an
/// error; a longer one closes the connection instead (the spec allows a hard disconnect for
/// a request beyond the maximum block size). 64 MiB: twice the advertised maximum, so a
/// client that ignores the maximum by a little still gets a clear EINVAL, while a garbage
/// length cannot make us read gigabytes.
pub const MAX_WRITE_DISCARD: u32 = 64 * 1024 * 1024;

/// What to do with the bytes after a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadAction {
    /// No payload follows.
    None,
    /// Read `n` bytes: the data of a valid WRITE.
    Read(u32),
    /// Skip `n` bytes, then send the error reply.
    Discard(u32),
    /// Send the error reply and close: the payload is too long to skip.
    Close,
}

/// Decides the payload handling of a header given its validation outcome.
pub fn payload_action(hdr: &RequestHeader, valid: bool) -> PayloadAction {
    match hdr.payload_len() {
        0 => PayloadAction::None,
        n if valid => PayloadAction::Read(n),
        n if n <= MAX_WRITE_DISCARD => PayloadAction::Discard(n),
        _ => PayloadAction::Close,
    }
}

// ---- replies ------------------------------------------------------------------------------

/// A simple reply header; for a successful READ the data follows.
pub fn encode_simple_reply(out: &mut impl BufMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A structured reply chunk header.
pub fn encode_chunk_header(out: &mut impl BufMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(len);
}

fn done(d: bool) -> u16 {
    if d {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// `NBD_REPLY_TYPE_NONE` with DONE: success with no payload.
pub fn encode_none(out: &mut impl BufMut, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// The header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `data_len` bytes of data
/// (at least 1, at most `u32::MAX - 8`) must follow.
pub fn encode_offset_data_header(
    out: &mut impl BufMut,
    cookie: u64,
    offset: u64,
    data_len: u32,
    last: bool,
) {
    encode_chunk_header(out, done(last), REPLY_TYPE_OFFSET_DATA, cookie, data_len + 8);
    out.put_u64(offset);
}

/// An `NBD_REPLY_TYPE_ERROR` chunk; the message is cut to 4096 bytes (at a char boundary).
pub fn encode_error_chunk(out: &mut impl BufMut, cookie: u64, error: u32, msg: &str, last: bool) {
    let mut end = msg.len().min(MAX_STRING_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg[..end];
    encode_chunk_header(out, done(last), REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (at least one descriptor).
pub fn encode_block_status(
    out: &mut impl BufMut,
    cookie: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
    last: bool,
) {
    let len = 4 + 8 * descriptors.len() as u32;
    encode_chunk_header(out, done(last), REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.put_u32(context_id);
    for d in descriptors {
        out.put_u32(d.length);
        out.put_u32(d.flags);
    }
}

/// A decoded reply header (client side; used by tests and tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, kind: u16, cookie: u64, length: u32 },
}

/// Decodes a simple or structured reply header from the front of `buf`; `Ok(None)` if it is
/// not all there yet.
pub fn decode_reply_header(buf: &mut BytesMut) -> Result<Option<ReplyHeader>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    match magic {
        SIMPLE_REPLY_MAGIC if buf.len() >= SIMPLE_REPLY_HEADER_LEN => {
            buf.advance(4);
            Ok(Some(ReplyHeader::Simple { error: buf.get_u32(), cookie: buf.get_u64() }))
        }
        STRUCTURED_REPLY_MAGIC if buf.len() >= STRUCTURED_REPLY_HEADER_LEN => {
            buf.advance(4);
            Ok(Some(ReplyHeader::Chunk {
                flags: buf.get_u16(),
                kind: buf.get_u16(),
                cookie: buf.get_u64(),
                length: buf.get_u32(),
            }))
        }
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC => Ok(None),
        found => Err(DecodeError::BadMagic { found }),
    }
}

#[cfg(test)]
#[path = "transmission_tests.rs"]
mod tests;
