//! The Raft log on sled: entries in tree `raft_log` keyed by big-endian
//! index, the vote, the committed id and the last purged id in tree
//! `raft_meta`. An append is reported flushed only once sled has flushed
//! it to disk: a flusher thread does that for every append waiting at the
//! time with one flush (group commit), in order, while Raft goes on.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Entry, NodeId, TypeConfig};

type StoreResult<T> = Result<T, StorageError<NodeId>>;

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The log store; clones share the same trees (one is the log reader).
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: Arc<Flusher>,
}

/// The flusher thread and the way to it. Dropping the last handle stops
/// the thread and waits for it, so the database is closed when the log
/// store is gone (and can be opened again at once).
struct Flusher {
    tx: Option<mpsc::Sender<LogFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Flushes sled for the appends waiting, then reports them flushed, in
/// order.
fn spawn_flusher(db: sled::Db) -> std::io::Result<Flusher> {
    let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
    let thread = std::thread::Builder::new()
        .name("relayrate-log-flush".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let waiting: Vec<_> = std::iter::once(first).chain(rx.try_iter()).collect();
                let started = std::time::Instant::now();
                let flushed = db.flush();
                crate::metrics::record_log_flush(waiting.len(), started.elapsed());
                for callback in waiting {
                    let result = match &flushed {
                        Ok(_) => Ok(()),
                        Err(e) => Err(std::io::Error::other(e.to_string())),
                    };
                    callback.log_io_completed(result);
                }
            }
        })?;
    Ok(Flusher {
        tx: Some(tx),
        thread: Some(thread),
    })
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(key);
    u64::from_be_bytes(b)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(bytes)
}

impl LogStore {
    pub fn open(db: &sled::Db) -> Result<LogStore, sled::Error> {
        Ok(LogStore {
            db: db.clone(),
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
            flusher: Arc::new(spawn_flusher(db.clone())?),
        })
    }

    fn read_meta<T: DeserializeOwned>(&self, name: &str) -> StoreResult<Option<T>> {
        let bytes = self.meta.get(name).map_err(|e| StorageIOError::read(&e))?;
        bytes
            .map(|b| decode(&b).map_err(|e| StorageIOError::read(&e).into()))
            .transpose()
    }

    async fn write_meta<T: Serialize>(&self, name: &str, value: &T) -> StoreResult<()> {
        let bytes = bincode::serialize(value).map_err(|e| StorageIOError::write(&e))?;
        self.meta
            .insert(name, bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        self.flush().await
    }

    async fn flush(&self) -> StoreResult<()> {
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    /// Removes the keys of `range` from the log, in one atomic batch.
    fn remove_range(&self, range: impl RangeBounds<[u8; 8]>) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(range).keys() {
            batch.remove(k.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => *i + 1,
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        for item in self.log.range(key(start)..) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            if !range.contains(&index_of(&k)) {
                break;
            }
            entries.push(decode(&v).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.read_meta(LAST_PURGED)?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, v)) => Some(
                decode::<Entry>(&v)
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .log_id,
            ),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        self.write_meta(VOTE, vote).await
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        // Not flushed: a lost committed id is only re-learned from the leader.
        let bytes = bincode::serialize(&committed).map_err(|e| StorageIOError::write(&e))?;
        self.meta
            .insert(COMMITTED, bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>(COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = bincode::serialize(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&key(entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // Readable now; durable, and so reported, only after the flush.
        let tx = self.flusher.tx.as_ref().expect("set until dropped");
        if let Err(mpsc::SendError(callback)) = tx.send(callback) {
            let gone = std::io::Error::other("log flusher stopped");
            callback.log_io_completed(Err(gone));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        self.remove_range(key(log_id.index)..)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        // The marker first: entries at or below it are ignored even if a
        // crash leaves them behind.
        self.write_meta(LAST_PURGED, &log_id).await?;
        self.remove_range(..=key(log_id.index))
    }
}
