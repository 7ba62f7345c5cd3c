//! The DR-side daemon of blockferry: receives replicated epochs, makes them durable in a redo
//! journal, applies them atomically, keeps recovery points and promotes.
//!
//! Not built yet: replication arrives with issue 4. This crate exists so the workspace has the
//! layout of shared/STYLE.md from the start.
#![forbid(unsafe_code)]
