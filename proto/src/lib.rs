//! The Leash v1 gRPC contract, generated from `proto/leash/v1/leash.proto`.
//!
//! The `.proto` file is the contract for clients in every language; this crate
//! is its Rust rendering (messages, `broker_client`, `broker_server`,
//! `verifier_client`, `verifier_server`) plus [`FILE_DESCRIPTOR_SET`] for gRPC
//! server reflection.

/// Messages and services of package `leash.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("leash.v1");
}

/// Encoded `FileDescriptorSet` of the Leash protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/leash_descriptor.bin"));
