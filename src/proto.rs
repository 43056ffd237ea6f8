//! Messages and services generated from `proto/relayrate/v1/*.proto`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("relayrate.v1");
}
