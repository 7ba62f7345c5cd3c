//! The NBD wire protocol (doc/proto.md of the NetworkBlockDevice/nbd repository), sans-IO.
//!
//! - [`consts`]: every magic, flag, option, reply type and error value used.
//! - [`handshake`]: the server side of fixed newstyle negotiation as a state machine
//!   ([`ServerHandshake`]) fed with received bytes, producing bytes to send and events.
//! - [`transmission`]: request header decoding, request validation ([`validate`]) and
//!   simple/structured reply encoding.
//!
//! Supported: fixed newstyle with `NO_ZEROES`; `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS`,
//! `INFO`, `GO` (export, name, description, block size), `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` / `SET_META_CONTEXT` over the contexts each export lists. Not
//! supported (answered `NBD_REP_ERR_UNSUP`): extended headers, `NBD_CMD_RESIZE`.

pub mod consts;
pub mod handshake;
pub mod transmission;

pub use handshake::{
    BlockSizes, ExportCatalog, ExportDesc, HandshakeConfig, HandshakeError, HandshakeEvent,
    MetaContext, Negotiated, ServerHandshake, TlsMode,
};
pub use transmission::{
    decode_reply_header, encode_block_status, encode_chunk_header, encode_error_chunk, encode_none,
    encode_offset_data_header, encode_simple_reply, payload_action, validate, BlockDescriptor,
    Command, DecodeError, PayloadAction, ReplyHeader, Request, RequestError, RequestHeader,
    TransmissionParams, MAX_WRITE_DISCARD,
};
