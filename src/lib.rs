//! Wire types for slotd, generated from `proto/slotd/v1/slotd.proto`, plus the descriptor set for reflection.
//!
//! This crate holds no logic: the daemon lives in `slotd`, the client in `slotd-client`.

/// `slotd.v1`: the agent-facing API (the `Acquire` stream, `ReportRateLimit`, `Status`).
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("slotd.v1");
}

/// The encoded `FileDescriptorSet` of every proto file (including well-known types), for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/slotd_descriptor.bin"));

pub use prost_types;
