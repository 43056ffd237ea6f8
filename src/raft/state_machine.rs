//! The Raft state machine: [`LimiterState`] in memory, shared with the
//! node that answers reads from it, and its latest snapshot on sled (tree
//! `raft_snapshot`). After a restart the state is the snapshot's, and
//! openraft re-applies the log entries after it.

use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::state::{LimiterSnapshot, LimiterState, Response};
use super::{Entry, Node, NodeId, TypeConfig};
use crate::clock::ClusterClock;
use crate::policy::Policy;

type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// What a snapshot's data starts with: its layout's name and number,
/// raised whenever the layout of [`LimiterSnapshot`] changes, so that a
/// node never reads another layout's bytes as its own.
const SNAPSHOT_FORMAT: &[u8; 8] = b"rrsnap02";

/// A snapshot's data of another layout than this version's.
#[derive(Debug, thiserror::Error)]
#[error(
    "the snapshot is of another layout than this version's ({}): it was written by another \
     version of relayrate; nodes of two layouts cannot share a cluster \
     (deploy/README.md, \"Upgrading\")",
    String::from_utf8_lossy(SNAPSHOT_FORMAT)
)]
pub struct OtherSnapshotFormat;

/// The snapshot's bincode after its format tag.
fn snapshot_body(data: &[u8]) -> Result<&[u8], OtherSnapshotFormat> {
    data.strip_prefix(SNAPSHOT_FORMAT.as_slice())
        .ok_or(OtherSnapshotFormat)
}

const CURRENT: &str = "current";

/// The snapshot as stored: openraft's meta and our state, bincode-encoded.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The state, readable by the node while Raft applies to it.
pub type SharedState = Arc<RwLock<LimiterState>>;

/// The cluster's time as this node knows it, fed with every stamp applied.
pub type SharedClock = Arc<Mutex<ClusterClock>>;

/// How far the log has been applied to the state. Changed only while the
/// state's write lock is held, and read for a snapshot under its read
/// lock: openraft builds a snapshot in a task of its own while applying
/// goes on, and a snapshot whose state is newer than its last log id would
/// have the entries in between applied twice after a restore.
#[derive(Clone, Default)]
struct AppliedTo {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

#[derive(Clone)]
pub struct StateMachine {
    state: SharedState,
    applied: Arc<Mutex<AppliedTo>>,
    clock: SharedClock,
    snapshots: sled::Tree,
    db: sled::Db,
    /// Makes snapshot ids unique.
    builds: u64,
    /// The last index of this node's log when it opened: entries up to it
    /// are replayed, not new (see [`StateMachine::replays_until`]).
    replay_until: u64,
}

/// A new cluster's state: no policy in force until one is applied, so
/// that every node starts from the same state.
pub fn initial_state() -> LimiterState {
    LimiterState::new(Arc::new(
        Policy::parse_str("(none)", "").expect("the empty policy parses"),
    ))
}

impl StateMachine {
    /// Opens the state machine, restoring the stored snapshot if any.
    pub fn open(db: &sled::Db) -> StoreResult<StateMachine> {
        let snapshots = db
            .open_tree("raft_snapshot")
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let sm = StateMachine {
            state: Arc::new(RwLock::new(initial_state())),
            applied: Arc::default(),
            clock: Arc::default(),
            snapshots,
            db: db.clone(),
            builds: 0,
            replay_until: 0,
        };
        if let Some(stored) = sm.stored()? {
            restore(&sm.shared_parts(), &stored.meta, &stored.data)?;
        }
        Ok(sm)
    }

    /// Entries up to `index` (the log's end when the node started) are
    /// its log replayed: what they log was logged when they were new.
    pub fn replays_until(&mut self, index: u64) {
        self.replay_until = index;
    }

    pub fn shared(&self) -> SharedState {
        self.state.clone()
    }

    pub fn clock(&self) -> SharedClock {
        self.clock.clone()
    }

    fn stored(&self) -> StoreResult<Option<StoredSnapshot>> {
        let bytes = self
            .snapshots
            .get(CURRENT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        bytes
            .map(|b| {
                super::decode_bounded(&b)
                    .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
            })
            .transpose()
    }

    /// Writes `stored` as the current snapshot, flushed, and gives it
    /// back. The encoding and sled's copy of the whole state's bytes run
    /// on a blocking thread, not the runtime's.
    async fn store(&self, stored: StoredSnapshot) -> StoreResult<StoredSnapshot> {
        let sig = Some(stored.meta.signature());
        let bad = |e: &dyn std::fmt::Display| {
            StorageIOError::write_snapshot(sig.clone(), openraft::AnyError::error(e.to_string()))
        };
        let tree = self.snapshots.clone();
        let written = tokio::task::spawn_blocking(move || {
            let bytes = bincode::serialize(&stored)?;
            tree.insert(CURRENT, bytes)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(stored)
        })
        .await
        .map_err(|e| bad(&e))?
        .map_err(|e| bad(&*e))?;
        self.db.flush_async().await.map_err(|e| bad(&e))?;
        Ok(written)
    }

    /// The current snapshot, read and decoded on a blocking thread.
    async fn stored_off_the_runtime(&self) -> StoreResult<Option<StoredSnapshot>> {
        let sm = self.clone();
        tokio::task::spawn_blocking(move || sm.stored())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
    }

    fn shared_parts(&self) -> SharedParts {
        SharedParts {
            state: self.state.clone(),
            applied: self.applied.clone(),
            clock: self.clock.clone(),
        }
    }
}

/// What a snapshot is read from and restored into, for a blocking thread.
struct SharedParts {
    state: SharedState,
    applied: Arc<Mutex<AppliedTo>>,
    clock: SharedClock,
}

/// The state's write lock, waited for without parking the runtime's
/// thread. A blocking thread may hold the read lock for a while (a
/// snapshot's copy or a `top`: tens of ms per 100k keys); on one thread, an
/// `apply` parked in `write()` would hold up every milter answer, read
/// and Raft message meanwhile, and make later readers queue behind it.
/// Tried again every millisecond while held.
async fn write_lock(state: &SharedState) -> RwLockWriteGuard<'_, LimiterState> {
    loop {
        match state.try_write() {
            Err(TryLockError::WouldBlock) => {}
            locked => return locked.expect("state lock"),
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Carries the cluster's time forward to the state's latest stamp.
fn observe_time(clock: &SharedClock, state: &LimiterState) {
    if state.now_ms() > 0 {
        let mut clock = clock.lock().expect("clock lock");
        clock.observe(state.now_ms(), Instant::now());
    }
}

/// Decodes a snapshot's bytes and puts its state in force. Costs CPU in
/// proportion to the keys (all of them decoded and indexed).
fn restore(parts: &SharedParts, meta: &SnapshotMeta<NodeId, Node>, data: &[u8]) -> StoreResult<()> {
    let bad = |e: &dyn std::error::Error| {
        StorageIOError::read_snapshot(
            Some(meta.signature()),
            openraft::AnyError::error(e.to_string()),
        )
    };
    let body = snapshot_body(data).map_err(|e| bad(&e))?;
    let snap: LimiterSnapshot = super::decode_bounded(body).map_err(|e| bad(&e))?;
    let state = LimiterState::from_snapshot(snap).map_err(|e| bad(&e))?;
    let old = {
        let mut current = parts.state.write().expect("state lock");
        let old = std::mem::replace(&mut *current, state);
        observe_time(&parts.clock, &current);
        *parts.applied.lock().expect("applied lock") = AppliedTo {
            last: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        old
    };
    // Freed after the lock is let go: freeing every key takes a while.
    drop(old);
    Ok(())
}

/// Copies the state under its read lock and encodes it: the snapshot's
/// bytes, and the log id and membership they are applied to.
fn encode(parts: &SharedParts) -> Result<(Vec<u8>, AppliedTo), bincode::Error> {
    let (snap, applied) = {
        let state = parts.state.read().expect("state lock");
        let applied = parts.applied.lock().expect("applied lock").clone();
        (state.snapshot(), applied)
    };
    // Encoded outside the lock: deciding goes on meanwhile.
    let mut data = SNAPSHOT_FORMAT.to_vec();
    bincode::serialize_into(&mut data, &snap)?;
    // `snap` is dropped here, letting go of the shared blocks of peaks
    // at once, so that the engine does not copy one it changes while
    // the snapshot is stored.
    Ok((data, applied))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        // On a blocking thread: the copy and the encoding take CPU in
        // proportion to the keys (tens of ms per 100k keys), and on the
        // runtime's thread (one by default) would hold up every milter
        // answer and Raft message behind them. The same for a restore.
        let parts = self.shared_parts();
        let (
            data,
            AppliedTo {
                last: last_applied,
                membership,
            },
        ) = tokio::task::spawn_blocking(move || encode(&parts))
            .await
            .map_err(|e| StorageIOError::read_state_machine(&e))?
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.builds),
            None => format!("none-{}", self.builds),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = self.store(StoredSnapshot { meta, data }).await?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        let applied = self.applied.lock().expect("applied lock");
        Ok((applied.last, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut state = write_lock(&self.state).await;
        let mut applied = self.applied.lock().expect("applied lock");
        for entry in entries {
            applied.last = Some(entry.log_id);
            state.set_replaying(entry.log_id.index <= self.replay_until);
            responses.push(match entry.payload {
                EntryPayload::Blank => Response::Done,
                EntryPayload::Normal(request) => state.apply(&request),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::Done
                }
            });
        }
        observe_time(&self.clock, &state);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.builds += 1;
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let (parts, for_restore) = (self.shared_parts(), meta.clone());
        let data = tokio::task::spawn_blocking(move || {
            restore(&parts, &for_restore, &data).map(|()| data)
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))??;
        self.store(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        tracing::info!(
            last_log_index = meta.last_log_id.map_or(0, |l| l.index),
            "snapshot installed from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.stored_off_the_runtime().await?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_of_another_layout_is_refused_by_name() {
        assert_eq!(snapshot_body(b"rrsnap02xyz").unwrap(), b"xyz");
        // An older layout had no tag: its bincode is refused, not misread.
        let old = bincode::serialize(&(1u64, vec![2u8; 40])).unwrap();
        let e = snapshot_body(&old).unwrap_err().to_string();
        assert!(
            e.contains("another layout") && e.contains("rrsnap02"),
            "{e}"
        );
    }
}
