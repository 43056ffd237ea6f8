//! How long the milter waits on an MTA connection, and how many it keeps
//! open: the values, their defaults, and their command-line flags.

use std::num::NonZeroUsize;
use std::time::Duration;

/// What one MTA connection may cost the milter. Enforced by the guarded
/// listener and stream (`listener.rs`, `guard.rs`) around indymilter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// After connecting, the MTA must have sent its first packet (OPTNEG)
    /// within this; Postfix and sendmail send it at once.
    pub negotiate_timeout: Duration,
    /// The longest wait for the MTA's next command; a packet begun must
    /// also be complete within it, however slowly its bytes come.
    pub idle_timeout: Duration,
    /// The longest wait from DATA to the end of the message, when the
    /// MTA says nothing while its client uploads the message.
    pub data_timeout: Duration,
    /// Connections open at once. At the cap a new connection is still
    /// taken, and the one idle longest is closed to make room, choosing
    /// first among those that have not negotiated.
    pub max_connections: NonZeroUsize,
}

impl Default for ConnLimits {
    fn default() -> ConnLimits {
        ConnLimits {
            negotiate_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            data_timeout: Duration::from_secs(600),
            max_connections: NonZeroUsize::new(1000).expect("not zero"),
        }
    }
}

impl ConnLimits {
    /// The longest of the waits; indymilter's own per-message timeout is
    /// set just above it, so only these limits ever apply.
    pub fn longest_wait(&self) -> Duration {
        self.negotiate_timeout
            .max(self.idle_timeout)
            .max(self.data_timeout)
    }
}

/// The flags of [`ConnLimits`], for `relayrate run` and `relayrate milter`.
#[derive(clap::Args, Clone, Debug)]
pub struct LimitArgs {
    /// Seconds the MTA has after connecting to the milter to open the
    /// conversation (OPTNEG); then the connection is closed.
    #[arg(long, default_value = "10", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub milter_negotiate_timeout_secs: u64,
    /// Seconds the milter waits for the MTA's next command (or for the
    /// rest of a packet begun) before closing the connection.
    #[arg(long, default_value = "30", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub milter_idle_timeout_secs: u64,
    /// Seconds the milter waits between DATA and the end of the message,
    /// while the MTA receives the message from its client.
    #[arg(long, default_value = "600", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub milter_data_timeout_secs: u64,
    /// Milter connections open at once; past it the connection idle
    /// longest is closed, one that has not negotiated first.
    #[arg(long, default_value = "1000")]
    pub milter_max_connections: NonZeroUsize,
}

impl LimitArgs {
    pub fn limits(&self) -> ConnLimits {
        ConnLimits {
            negotiate_timeout: Duration::from_secs(self.milter_negotiate_timeout_secs),
            idle_timeout: Duration::from_secs(self.milter_idle_timeout_secs),
            data_timeout: Duration::from_secs(self.milter_data_timeout_secs),
            max_connections: self.milter_max_connections,
        }
    }
}
