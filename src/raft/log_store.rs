//! The Raft log on sled: entries in tree `raft_log` keyed by big-endian
//! index, the vote, the committed id and the last purged id in tree
//! `raft_meta`. An append is reported flushed only once sled has flushed
//! it to disk: a flusher thread does that for every append waiting at the
//! time with one flush (group commit), in order, while Raft goes on.
//! Purged entries are removed by a thread of their own: removing thousands
//! of keys takes tens of milliseconds, and openraft waits for `purge`.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
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
    flusher: Arc<Worker<LogFlushed<TypeConfig>>>,
    purger: Arc<Worker<u64>>,
    /// The lowest index not purged: entries below it may still be on disk
    /// until the purge thread has removed them, and are never read.
    first_kept: Arc<AtomicU64>,
}

/// A thread that serves the jobs sent to it, each with those waiting
/// behind it. Dropping the last handle stops the thread and waits for it,
/// so the database is closed when the log store is gone (and can be
/// opened again at once).
struct Worker<T> {
    tx: Option<mpsc::Sender<T>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T: Send + 'static> Worker<T> {
    fn spawn(name: &str, mut serve: impl FnMut(Vec<T>) + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<T>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    serve(std::iter::once(first).chain(rx.try_iter()).collect());
                }
            })?;
        Ok(Worker {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands a job to the thread; gives it back if the thread is gone.
    fn send(&self, job: T) -> Result<(), T> {
        let tx = self.tx.as_ref().expect("set until dropped");
        tx.send(job).map_err(|mpsc::SendError(job)| job)
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Flushes sled for the appends waiting, then reports them flushed, in
/// order.
fn spawn_flusher(db: sled::Db) -> std::io::Result<Worker<LogFlushed<TypeConfig>>> {
    Worker::spawn(
        "relayrate-log-flush",
        move |waiting: Vec<LogFlushed<TypeConfig>>| {
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
        },
    )
}

/// Removes the entries at or below the highest index asked for. The
/// `last_purged` marker is already stored, so a failure here or a crash
/// before it only leaves entries that nothing reads, and the next purge
/// removes them.
fn spawn_purger(log: sled::Tree) -> std::io::Result<Worker<u64>> {
    Worker::spawn("relayrate-log-purge", move |upto| {
        let upto = upto.into_iter().max().expect("at least one");
        if let Err(e) = remove_up_to(&log, upto) {
            tracing::warn!(error = %e, upto, "could not remove purged log entries");
        }
    })
}

/// Entries removed by one batch of a purge. A sled batch holds sled's
/// one lock for the whole database, which every append and read waits
/// for: 5,000 in one batch held it 20 to 53 ms (BENCHMARKS.md).
const PURGE_BATCH: usize = 256;

/// Removes the entries at or below `upto`, [`PURGE_BATCH`] at a time,
/// lowest first, so that what is left is always one run of entries.
fn remove_up_to(log: &sled::Tree, upto: u64) -> sled::Result<()> {
    loop {
        let mut batch = sled::Batch::default();
        let mut taken = 0;
        for k in log.range(..=key(upto)).keys().take(PURGE_BATCH) {
            batch.remove(k?);
            taken += 1;
        }
        if taken > 0 {
            log.apply_batch(batch)?;
        }
        if taken < PURGE_BATCH {
            return Ok(());
        }
    }
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
    super::decode_bounded(bytes)
}

impl LogStore {
    pub fn open(db: &sled::Db) -> Result<LogStore, StorageError<NodeId>> {
        let io =
            |e: &dyn std::error::Error| StorageIOError::read_logs(openraft::AnyError::error(e));
        let log = db.open_tree("raft_log").map_err(|e| io(&e))?;
        let meta = db.open_tree("raft_meta").map_err(|e| io(&e))?;
        let purged: Option<LogId<NodeId>> = match meta.get(LAST_PURGED).map_err(|e| io(&e))? {
            Some(bytes) => Some(decode(&bytes).map_err(|e| io(&e))?),
            None => None,
        };
        Ok(LogStore {
            db: db.clone(),
            log: log.clone(),
            meta,
            flusher: Arc::new(spawn_flusher(db.clone()).map_err(|e| io(&e))?),
            purger: Arc::new(spawn_purger(log).map_err(|e| io(&e))?),
            first_kept: Arc::new(AtomicU64::new(purged.map_or(0, |l| l.index + 1))),
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
}

/// Removes the keys of `range` from the log, in one atomic batch.
fn remove_range(log: &sled::Tree, range: impl RangeBounds<[u8; 8]>) -> sled::Result<()> {
    let mut batch = sled::Batch::default();
    for k in log.range(range).keys() {
        batch.remove(k?);
    }
    log.apply_batch(batch)
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
        }
        .max(self.first_kept.load(Ordering::Acquire));
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
        let first_kept = self.first_kept.load(Ordering::Acquire);
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((k, v)) if index_of(&k) >= first_kept => Some(
                decode::<Entry>(&v)
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .log_id,
            ),
            _ => None,
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
        if let Err(callback) = self.flusher.send(callback) {
            let gone = std::io::Error::other("log flusher stopped");
            callback.log_io_completed(Err(gone));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        remove_range(&self.log, key(log_id.index)..).map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        // The marker first: entries at or below it are ignored even if a
        // crash leaves them behind. Their removal is left to the purge
        // thread, so that Raft does not wait for it.
        self.write_meta(LAST_PURGED, &log_id).await?;
        self.first_kept
            .fetch_max(log_id.index + 1, Ordering::AcqRel);
        if self.purger.send(log_id.index).is_err() {
            return Err(
                StorageIOError::write_logs(&std::io::Error::other("log purger stopped")).into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of entries 1..=n at term 1, written straight into sled (an
    /// append needs a callback only openraft can make), then purged up to
    /// `upto`.
    async fn purged_log(db: &sled::Db, n: u64, upto: u64) -> (LogStore, LogId<NodeId>) {
        let mut store = LogStore::open(db).unwrap();
        for i in 1..=n {
            let entry = openraft::testing::blank_ent::<TypeConfig>(1, 1, i);
            store
                .log
                .insert(key(i), bincode::serialize(&entry).unwrap())
                .unwrap();
        }
        let purged = openraft::testing::log_id(1, 1, upto);
        store.purge(purged).await.unwrap();
        (store, purged)
    }

    #[tokio::test]
    async fn purged_entries_are_never_read_and_are_gone_once_the_store_closes() {
        let dir = tempfile::TempDir::new().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let (mut store, purged) = purged_log(&db, 5000, 4000).await;

            // Whether or not the purge thread has removed them yet.
            let kept = store.try_get_log_entries(0..).await.unwrap();
            assert_eq!(kept.len(), 1000);
            assert_eq!(kept[0].log_id.index, 4001);
            let state = store.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(purged));
            assert_eq!(state.last_log_id.map(|l| l.index), Some(5000));
        }
        // Closing the store waited for the purge thread: the entries are
        // off the disk, and the marker holds after reopening. (sled's I/O
        // thread may hold the file lock a moment after the last handle.)
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < until => eprintln!("not yet: {e}"),
                Err(e) => panic!("the db does not open again: {e}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let mut store = LogStore::open(&db).unwrap();
        assert_eq!(store.log.len(), 1000);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(4000));
        assert_eq!(store.try_get_log_entries(..4001).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn a_log_purged_to_its_end_reports_the_purged_id_as_its_last() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let (mut store, purged) = purged_log(&db, 10, 10).await;
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(purged));
        assert!(store.try_get_log_entries(0..).await.unwrap().is_empty());
    }
}
