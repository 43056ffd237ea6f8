//! relayrate: outgoing-mail rate limits that hold for a whole cluster of
//! relays.
//!
//! How the crate is laid out, from the inside out:
//! - [`check`]: the checks of ze-filter (ConnRate, MsgRate, ...), their
//!   switches, defaults and SMTP replies.
//! - [`policy`]: reads `ze-policy.txt` and answers "which limit applies to
//!   this client" in a few hash probes.
//! - [`window`]: the sliding-window counter (30 s buckets over 600 s).
//! - [`clock`]: the cluster's time, carried forward from the log's
//!   stamps, so that no leader's wall clock can end a window early.
//! - [`engine`]: the limiter state; applies the events of SMTP sessions at
//!   a given time and returns verdicts. Pure: no I/O, no clock.
//! - [`history`]: mail logs read back into sessions, replayed through the
//!   engine (`relayrate replay`) or counted to choose limits (`suggest`).
//! - [`inspect`]: who is near a limit, every count of one key (for the
//!   admin service).
//! - [`limiter_client`]: a node client that sends concurrent callers' events
//!   in one call.
//! - [`proto`]: the gRPC messages of `proto/relayrate/v1/`.
//! - [`terminal`] and [`logs`]: what the processes print and log, with
//!   values from outside escaped.
//! - [`bounds`]: how much input is taken from outside, and how much of it
//!   an error message shows.
//!
//! Data flows one way: the MTA's milter turns an SMTP session into
//! [`engine::Event`]s, the engine (on a node, replicated through Raft, or
//! in the milter's fallback) turns them into [`engine::Verdict`]s, and the
//! milter answers the MTA with the verdict's reply.
#![forbid(unsafe_code)]

pub mod baseline;
pub mod bench;
pub mod bounds;
pub mod check;
pub mod clock;
pub mod convert;
pub mod dashboard;
pub mod engine;
pub mod history;
pub mod inspect;
pub mod limiter_client;
pub mod logs;
pub mod metrics;
pub mod milter;
pub mod node;
pub mod peaks;
pub mod policy;
pub mod proto;
pub mod raft;
pub mod terminal;
pub mod tls;
pub mod window;
