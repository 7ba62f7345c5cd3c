//! The DR-side daemon of blockferry: receives replicated epochs, makes them durable in a redo
//! journal, applies them atomically, keeps recovery points and promotes.
//!
//! Built so far: [`store`], the per-volume replica store (journal, commit, apply, recovery).
#![forbid(unsafe_code)]

pub mod admin;
pub mod server;
pub mod store;

#[cfg(test)]
mod simulation;
