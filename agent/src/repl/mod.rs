//! Replication of a volume to its DR target (DESIGN.md, primary write path steps 5 and 6).

pub mod capture;
pub mod limiter;
mod resync;
pub mod shipper;
