//! What a log entry and the Raft payloads may hold. The leader checks a
//! command before it proposes it ([`proposable`]), a node checks the entries and proposals
//! a peer sends, and [`LimiterState::apply`](super::state::LimiterState::apply)
//! checks again: an entry out of bounds (forged, or written by an older
//! version) changes nothing. The bounds are those of [`crate::bounds`].

use std::collections::HashSet;
use std::sync::Mutex;

use openraft::error::{InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, InstallSnapshotResponse};
use openraft::{EntryPayload, Membership, SnapshotSegmentId};

use super::state::{Command, Request};
use super::{Entry, Node, NodeId, TypeConfig};
use crate::bounds::{
    count, cut, text, Invalid, MAX_ENTRY_BYTES, MAX_ENTRY_EVENTS, MAX_FIELD_BYTES, MAX_MEMBERS,
    MAX_POLICY_BYTES, MAX_POLICY_FILES, MAX_POLICY_NAME_BYTES, MAX_SENDERS, MAX_SNAPSHOT_BYTES,
    MAX_STAMP_MS,
};
use crate::engine::{CounterKey, Event};
use crate::policy::{Client, Policy, PolicyFile};

/// A request as an entry holds it: the leader's stamp and the command.
pub fn request(r: &Request) -> Result<(), Invalid> {
    if r.stamp_ms > MAX_STAMP_MS {
        return Err(Invalid(format!(
            "stamp {} ms is past the year 9999",
            r.stamp_ms
        )));
    }
    command(&r.command)
}

/// A command the leader may propose: within bounds, and a policy that
/// parses (one that does not would be refused by every node anyway).
pub fn proposable(c: &Command) -> Result<(), Invalid> {
    command(c)?;
    if let Command::SetPolicy { files } = c {
        Policy::parse(files.clone()).map_err(|e| Invalid(e.to_string()))?;
    }
    Ok(())
}

/// A command, as the leader proposes it and before it is applied.
pub fn command(c: &Command) -> Result<(), Invalid> {
    match c {
        Command::Decide { senders, events } => {
            count("senders in one entry", senders.len(), MAX_SENDERS)?;
            let origins: HashSet<u64> = senders.iter().map(|s| s.origin).collect();
            for (id, _) in events {
                if !origins.contains(&id.origin) {
                    return Err(Invalid(format!(
                        "event of node {:#x}, which is not among the entry's senders",
                        id.origin
                    )));
                }
            }
            self::events(events.iter().map(|(_, e)| e))
        }
        Command::SetPolicy { files } => policy_files(files),
        Command::Heartbeat { .. } => Ok(()),
        Command::Reset {
            key, requested_by, ..
        } => {
            counter_key(key)?;
            // Who asked, and the address they asked from.
            text("requested_by", requested_by, 2 * MAX_FIELD_BYTES)
        }
    }
}

/// The events of one call or entry: how many, and how big together.
pub fn events<'a>(events: impl ExactSizeIterator<Item = &'a Event>) -> Result<(), Invalid> {
    count("events in one batch", events.len(), MAX_ENTRY_EVENTS)?;
    let mut bytes = 0;
    for e in events {
        event(e)?;
        bytes += event_bytes(e);
    }
    if bytes > MAX_ENTRY_BYTES {
        return Err(Invalid(format!(
            "events too large together: {bytes} bytes, at most {MAX_ENTRY_BYTES}"
        )));
    }
    Ok(())
}

/// About what an event takes in an entry, in bytes: its fixed part and
/// its texts.
pub fn event_bytes(e: &Event) -> usize {
    const FIXED: usize = 96;
    let texts = |c: &Client| {
        [&c.host, &c.sender, &c.auth]
            .iter()
            .map(|t| t.as_ref().map_or(0, String::len))
            .sum::<usize>()
    };
    FIXED + event_client(e).map_or(0, texts)
}

fn event_client(e: &Event) -> Option<&Client> {
    match e {
        Event::Connect { client, .. }
        | Event::Recheck { client }
        | Event::Mail { client, .. }
        | Event::Rcpt { client, .. }
        | Event::GiveBack { client, .. } => Some(client),
        Event::Close { .. } => None,
    }
}

pub fn event(e: &Event) -> Result<(), Invalid> {
    event_client(e).map_or(Ok(()), client)
}

pub fn client(c: &Client) -> Result<(), Invalid> {
    for (what, value) in [
        ("client host", &c.host),
        ("client sender", &c.sender),
        ("client auth", &c.auth),
    ] {
        if let Some(v) = value {
            text(what, v, MAX_FIELD_BYTES)?;
        }
    }
    Ok(())
}

pub fn counter_key(key: &CounterKey) -> Result<(), Invalid> {
    match key {
        CounterKey::Ip(_) => Ok(()),
        CounterKey::Name(n) => text("key", n, MAX_FIELD_BYTES),
    }
}

/// A policy's files: how many, their names, their size together.
pub fn policy_files(files: &[PolicyFile]) -> Result<(), Invalid> {
    count("policy files", files.len(), MAX_POLICY_FILES)?;
    let mut total = 0;
    for f in files {
        text("policy file name", &f.name, MAX_POLICY_NAME_BYTES)?;
        total += f.text.len();
    }
    if total > MAX_POLICY_BYTES {
        return Err(Invalid(format!(
            "policy too large: {total} bytes, at most {MAX_POLICY_BYTES}"
        )));
    }
    Ok(())
}

/// The members of a membership entry or a snapshot's meta.
pub fn membership(m: &Membership<NodeId, Node>) -> Result<(), Invalid> {
    count("members", m.nodes().count(), MAX_MEMBERS)?;
    for (_, node) in m.nodes() {
        node_addr(&node.addr)?;
    }
    Ok(())
}

/// A node's address, as members know it.
pub fn node_addr(addr: &str) -> Result<(), Invalid> {
    text("node address", addr, MAX_FIELD_BYTES)
}

pub fn entry(e: &Entry) -> Result<(), Invalid> {
    match &e.payload {
        EntryPayload::Blank => Ok(()),
        EntryPayload::Normal(r) => request(r),
        EntryPayload::Membership(m) => membership(m),
    }
}

/// Entries from the leader, checked before they are stored.
pub fn append_entries(req: &AppendEntriesRequest<TypeConfig>) -> Result<(), Invalid> {
    for e in &req.entries {
        entry(e).map_err(|why| Invalid(format!("log entry {}: {why}", e.log_id.index)))?;
    }
    Ok(())
}

/// The snapshot being received from the leader, so that each chunk lands
/// within what was received before it: a chunk at a far offset would make
/// the receiving buffer that large.
#[derive(Default)]
pub struct SnapshotChunks {
    /// The snapshot's id and the bytes received of it.
    current: Mutex<Option<(String, u64)>>,
}

/// Why a snapshot chunk was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkRefused {
    /// Not the chunk that comes next: start over from offset 0 (what
    /// openraft answers such a chunk as well).
    Mismatch,
    Invalid(Invalid),
}

impl ChunkRefused {
    /// What the peer hears: a mismatch as openraft would answer it (the
    /// leader then starts the snapshot over), or INVALID_ARGUMENT.
    pub fn answer(
        self,
        req: &InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResult, Invalid> {
        match self {
            ChunkRefused::Invalid(e) => Err(e),
            ChunkRefused::Mismatch => {
                let segment = |offset| SnapshotSegmentId {
                    id: req.meta.snapshot_id.clone(),
                    offset,
                };
                let mismatch = SnapshotMismatch {
                    expect: segment(0),
                    got: segment(req.offset),
                };
                Ok(Err(RaftError::APIError(
                    InstallSnapshotError::SnapshotMismatch(mismatch),
                )))
            }
        }
    }
}

/// openraft's answer to a snapshot chunk.
pub type InstallSnapshotResult =
    Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

impl SnapshotChunks {
    /// Checks a chunk and counts it received. The first chunk of a
    /// snapshot is at offset 0; each other one of the same snapshot starts
    /// within the bytes received before it.
    pub fn receive(&self, req: &InstallSnapshotRequest<TypeConfig>) -> Result<(), ChunkRefused> {
        let id = &req.meta.snapshot_id;
        text("snapshot id", id, MAX_FIELD_BYTES).map_err(ChunkRefused::Invalid)?;
        membership(req.meta.last_membership.membership()).map_err(ChunkRefused::Invalid)?;
        let len = req.data.len() as u64;
        let mut current = self.current.lock().expect("chunks lock");
        let received = match &*current {
            Some((current_id, received)) if current_id == id && req.offset <= *received => {
                *received
            }
            _ if req.offset == 0 => 0,
            _ => return Err(ChunkRefused::Mismatch),
        };
        let end = req.offset.saturating_add(len);
        if end > MAX_SNAPSHOT_BYTES {
            return Err(ChunkRefused::Invalid(Invalid(format!(
                "snapshot {} too large: {end} bytes, at most {MAX_SNAPSHOT_BYTES}",
                cut(id)
            ))));
        }
        *current = Some((id.clone(), received.max(end)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: &str, offset: u64, len: usize) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: openraft::Vote::new_committed(1, 1),
            meta: openraft::SnapshotMeta {
                last_log_id: None,
                last_membership: Default::default(),
                snapshot_id: id.into(),
            },
            offset,
            data: vec![0; len],
            done: false,
        }
    }

    #[test]
    fn snapshot_chunks_land_within_what_was_received() {
        let chunks = SnapshotChunks::default();
        let receive = |id, offset, len| chunks.receive(&chunk(id, offset, len));
        assert_eq!(receive("a", 5, 1), Err(ChunkRefused::Mismatch));
        assert_eq!(receive("a", 0, 10), Ok(()));
        assert_eq!(receive("a", 10, 10), Ok(()));
        // A chunk sent again, and one past a gap.
        assert_eq!(receive("a", 10, 10), Ok(()));
        assert_eq!(receive("a", 21, 1), Err(ChunkRefused::Mismatch));
        assert_eq!(receive("b", 20, 1), Err(ChunkRefused::Mismatch));
        // Another snapshot starts at 0; the first one's bytes are gone.
        assert_eq!(receive("b", 0, 1), Ok(()));
        assert_eq!(receive("a", 10, 1), Err(ChunkRefused::Mismatch));
        let long_id = "i".repeat(MAX_FIELD_BYTES + 1);
        let refused = chunks.receive(&chunk(&long_id, 0, 1));
        assert!(matches!(refused, Err(ChunkRefused::Invalid(_))));
    }
}
