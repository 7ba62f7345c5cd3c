//! The NBD wire protocol (doc/proto.md of the NetworkBlockDevice/nbd repository), sans-IO.
