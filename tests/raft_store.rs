//! openraft's storage conformance suite on the sled log store and state
//! machine, and a restart that finds the log and the snapshot again.

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{blank_ent, StoreBuilder, Suite};
use openraft::{RaftSnapshotBuilder, StorageError};
use relayrate::raft::log_store::LogStore;
use relayrate::raft::state_machine::StateMachine;
use relayrate::raft::{NodeId, TypeConfig};
use tempfile::TempDir;

struct SledStores;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledStores {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = TempDir::new().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled opens");
        let log = LogStore::open(&db).expect("log trees");
        Ok((dir, log, StateMachine::open(&db)?))
    }
}

#[test]
fn openraft_suite_passes_on_the_sled_stores() {
    if let Err(e) = Suite::test_all(SledStores) {
        panic!("storage suite failed: {e}");
    }
}

/// Opens a sled db that was just closed. sled's I/O thread lets go of a
/// db only after it has handed back the result of its last flush, so the
/// file lock can outlive the last handle by a moment.
async fn open_again(path: &std::path::Path) -> sled::Db {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < until => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("sled db does not open again: {e}"),
        }
    }
}

#[tokio::test]
async fn vote_and_snapshot_survive_reopening() {
    let dir = TempDir::new().unwrap();
    let vote = openraft::Vote::new(3, 2);
    {
        let db = sled::open(dir.path()).unwrap();
        let mut log = LogStore::open(&db).unwrap();
        log.save_vote(&vote).await.unwrap();
        let mut sm = StateMachine::open(&db).unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
    }
    let db = open_again(dir.path()).await;
    let mut log = LogStore::open(&db).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    let mut sm = StateMachine::open(&db).unwrap();
    assert!(sm.get_current_snapshot().await.unwrap().is_some());
}

/// openraft builds a snapshot in a task of its own while entries go on
/// being applied: the snapshot's last log id must be that of the state it
/// holds, or a node restored from it applies the entries in between twice.
#[tokio::test]
async fn a_snapshot_built_while_entries_are_applied_names_the_state_it_holds() {
    let dir = TempDir::new().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let mut sm = StateMachine::open(&db).unwrap();
    let entries = |r: std::ops::RangeInclusive<u64>| r.map(|i| blank_ent::<TypeConfig>(1, 1, i));
    sm.apply(entries(1..=3)).await.unwrap();
    let mut builder = sm.get_snapshot_builder().await;
    sm.apply(entries(4..=5)).await.unwrap();
    let snapshot = builder.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(5));
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, snapshot.meta.last_log_id);
}
