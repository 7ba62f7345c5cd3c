//! The primary-side daemon of blockferry: serves volumes to clients over NBD, writes every block
//! through a disk engine, and (in later issues) tracks changed blocks and ships them.
//!
//! Unsafe code is allowed only in the io_uring engine (`engine::uring`), where every block
//! carries a `// SAFETY:` comment.
#![deny(unsafe_code)]

pub mod admin;
pub mod cbt;
pub mod config;
pub mod engine;
pub mod nbd;
pub mod repl;
pub mod size;
pub mod stats;
mod tasks;
pub mod volume;
