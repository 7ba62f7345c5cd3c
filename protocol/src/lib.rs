//! blockferry's wire formats as sans-IO code.
//!
//! Nothing in this crate touches a socket, a file or a clock: decoders take bytes, encoders
//! write into `BufMut`, state machines take events and return actions. The async drivers in
//! `agent` and `target` pump bytes and timers around them.
#![forbid(unsafe_code)]

pub mod nbd;
pub mod repl;
