//! Messages and services generated from `proto/relayrate/v1/*.proto`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("relayrate.v1");
}

/// The encoded descriptors of every relayrate service, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("relayrate");
