//! Skipping a test loudly. `cargo test` shows a test's own output only
//! when it fails, so a skip is written to the process's stderr directly
//! (past libtest's capture), and when the test binary ends it prints one
//! line that sums up every skip it made.

use std::io::Write;
use std::sync::{Mutex, Once};

/// The skips of this test binary: (test, why).
static SKIPPED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static SUMMARY_AT_EXIT: Once = Once::new();

/// Records that `test` did not run because of `why`, says so at once, and
/// once per binary arranges the summary line at exit. With
/// `RELAYRATE_REQUIRE_MTA=1` (CI) a skip is a failure instead: panics.
pub fn skip(test: &str, why: &str) {
    if std::env::var("RELAYRATE_REQUIRE_MTA").as_deref() == Ok("1") {
        panic!("{test}: {why}, and RELAYRATE_REQUIRE_MTA=1 forbids skipping");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    SKIPPED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((test.to_string(), why.to_string()));
    SUMMARY_AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" fn with no arguments; it
        // runs once, when the process exits after libtest's report.
        unsafe { libc::atexit(summary) };
    });
}

/// One line: how many tests were skipped, and why.
extern "C" fn summary() {
    let skipped = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    let mut reasons: Vec<&str> = skipped.iter().map(|(_, why)| why.as_str()).collect();
    reasons.sort_unstable();
    reasons.dedup();
    let names: Vec<&str> = skipped.iter().map(|(test, _)| test.as_str()).collect();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {} test(s) of {}: {} ({})",
        skipped.len(),
        std::env::args().next().unwrap_or_default(),
        reasons.join("; "),
        names.join(", ")
    );
}
