//! openraft's storage conformance suite on the sled log store and state
//! machine, and a restart that finds the log and the snapshot again.

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
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
    let db = sled::open(dir.path()).unwrap();
    let mut log = LogStore::open(&db).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    let mut sm = StateMachine::open(&db).unwrap();
    assert!(sm.get_current_snapshot().await.unwrap().is_some());
}
