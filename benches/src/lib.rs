//! blockferry's benchmarks. The side-by-side runs against peers are scripts in this folder
//! (see `nbd_peers.sh`); their figures are recorded in BENCHMARKS.md at the top of the repo.
#![forbid(unsafe_code)]
