//! `relayrate bench`: a load generator for the `Limiter` service. A
//! session sends a Connect for the next of K client addresses of
//! 10.77.0.0/16, then its Close, and measures the Connect's round trip.
//! Sessions share one [`BatchingClient`] per target, as a milter's do, so
//! concurrent events leave in one call.
//!
//! Closed loop (the default): C workers, each starting its next session
//! when the last one ends. Open loop (`--rate R`): a session starts every
//! 1/R seconds whatever the answers, at most C at once; this measures the
//! latency at a given load.
//!
//! A run ends by the wall clock: no session starts after `--duration`,
//! and sessions still waiting [`DRAIN`] after it are abandoned (counted
//! apart), so a node that hangs cannot hold the run.

use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Endpoint;

use crate::engine::{ConnId, Event};
use crate::limiter_client::BatchingClient;
use crate::policy::Client;
use crate::terminal::{print_err, print_out, Escaped};

/// A call not answered in this time counts as an error for its events.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// How long sessions in flight at the end of the run may still take.
pub const DRAIN: Duration = Duration::from_millis(500);
/// How late tokio's millisecond timer may wake the open loop.
const TIMER_SLACK: Duration = Duration::from_millis(2);

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Node URLs, comma-separated; workers are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:7450")]
    pub target: Vec<String>,
    /// Sessions at once: the workers of the closed loop, or with `--rate`
    /// the most sessions open at once.
    #[arg(long, default_value = "16")]
    pub concurrency: usize,
    /// Open loop: start this many sessions (decisions) a second, spread
    /// evenly, whatever the answers.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: Option<u32>,
    /// Seconds to run.
    #[arg(long, default_value = "10")]
    pub duration: u64,
    /// Distinct client addresses (10.77.0.1, 10.77.0.2, ...).
    #[arg(long, default_value = "1000", value_parser = clap::value_parser!(u32).range(1..=65534))]
    pub keys: u32,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What a run measured. A decision is one Connect verdict; each Connect is
/// followed by a Close, so the cluster counts two events per decision.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub decisions: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    /// Sessions still waiting for their Connect's verdict when the run
    /// ended (its duration and [`DRAIN`]); not in the other counts.
    pub abandoned: u64,
    pub per_second: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// The `i`-th client address (0-based) of 10.77.0.0/16.
pub fn key_address(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 77, 0, 0)) + i + 1,
    ))
}

#[derive(Default)]
struct Tally {
    allowed: u64,
    denied: u64,
    errors: u64,
    abandoned: u64,
    latencies_us: Vec<u64>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.errors += other.errors;
        self.abandoned += other.abandoned;
        self.latencies_us.extend(other.latencies_us);
    }
}

pub async fn run(args: BenchArgs) -> ExitCode {
    match measure(&args).await {
        Ok(report) => {
            if args.json {
                let json = serde_json::to_string(&report).expect("plain data");
                print_out(&format!("{json}\n"));
            } else {
                print_out(&format!(
                    "decisions {}  allowed {}  denied {}  errors {}  abandoned {}  {:.0}/s  p50 {} us  p99 {} us\n",
                    report.decisions,
                    report.allowed,
                    report.denied,
                    report.errors,
                    report.abandoned,
                    report.per_second,
                    report.p50_us,
                    report.p99_us
                ));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_err(&format!("relayrate bench: {}\n", Escaped(e)));
            ExitCode::from(1)
        }
    }
}

pub async fn measure(args: &BenchArgs) -> Result<Report, String> {
    let clients = args
        .target
        .iter()
        .map(|t| {
            Endpoint::from_shared(t.clone())
                .map(|e| BatchingClient::new(e.tcp_nodelay(true).connect_lazy(), CALL_DEADLINE))
                .map_err(|e| format!("bad target {t}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let keys = u64::from(args.keys);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let mut total = match args.rate {
        Some(rate) => open_loop(rate, args.concurrency, &clients, keys, started, deadline).await,
        None => closed_loop(args.concurrency, &clients, keys, deadline).await?,
    };
    let elapsed = started.elapsed().as_secs_f64();
    total.latencies_us.sort_unstable();
    let pct = |p: f64| {
        let l = &total.latencies_us;
        if l.is_empty() {
            0
        } else {
            l[((l.len() - 1) as f64 * p).round() as usize]
        }
    };
    let decisions = total.allowed + total.denied;
    Ok(Report {
        decisions,
        allowed: total.allowed,
        denied: total.denied,
        errors: total.errors,
        abandoned: total.abandoned,
        per_second: decisions as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

async fn closed_loop(
    workers: usize,
    clients: &[BatchingClient],
    keys: u64,
    deadline: Instant,
) -> Result<Tally, String> {
    let next_key = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..workers.max(1))
        .map(|w| {
            let client = clients[w % clients.len()].clone();
            let next_key = next_key.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let i = next_key.fetch_add(1, Ordering::Relaxed) % keys;
                    let conn = ConnId {
                        owner: 0,
                        conn: ((w as u64) << 40) | n,
                    };
                    n += 1;
                    session(&client, conn, i, Instant::now(), deadline, &mut tally).await;
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        total.add(w.await.map_err(|e| e.to_string())?);
    }
    Ok(total)
}

/// A session starts every 1/`rate` seconds from `started`, at most
/// `concurrency` at once. A Connect's time includes any wait for a free
/// session, so the figures are those of the offered load, not only of
/// the sessions the cluster let through.
async fn open_loop(
    rate: u32,
    concurrency: usize,
    clients: &[BatchingClient],
    keys: u64,
    started: Instant,
    deadline: Instant,
) -> Tally {
    let free = Arc::new(Semaphore::new(concurrency.max(1)));
    let (done, mut tallies) = mpsc::unbounded_channel::<Tally>();
    let mut n = 0u64;
    loop {
        let due = started + Duration::from_secs_f64(n as f64 / f64::from(rate));
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        // tokio's timer ticks every millisecond: a wake-up up to a tick
        // late is the timer's, and the time runs from the wake-up. Later
        // than that, this loop was held up waiting for a free session, and
        // the time runs from when the session was due.
        let woke = Instant::now();
        let from = match woke.duration_since(due) <= TIMER_SLACK {
            true => woke,
            false => due,
        };
        // Every session may hang: wait for a free one only until the end.
        let Ok(permit) =
            tokio::time::timeout_at(deadline.into(), free.clone().acquire_owned()).await
        else {
            break;
        };
        let permit = permit.expect("never closed");
        let client = clients[n as usize % clients.len()].clone();
        let done = done.clone();
        let conn = ConnId { owner: 0, conn: n };
        let i = n % keys;
        tokio::spawn(async move {
            let mut tally = Tally::default();
            session(&client, conn, i, from, deadline, &mut tally).await;
            let _ = done.send(tally);
            drop(permit);
        });
        n += 1;
    }
    drop(done);
    let mut total = Tally::default();
    while let Some(t) = tallies.recv().await {
        total.add(t);
    }
    total
}

/// One session: the Connect of the `i`-th address, timed from `from`, then
/// its Close; neither waited for past the run's `deadline` and [`DRAIN`].
async fn session(
    client: &BatchingClient,
    conn: ConnId,
    i: u64,
    from: Instant,
    deadline: Instant,
    tally: &mut Tally,
) {
    let cutoff = tokio::time::Instant::from_std(deadline + DRAIN);
    let connect = Event::Connect {
        conn,
        client: Client::from_ip(key_address(i as u32)),
    };
    let Ok(answered) = tokio::time::timeout_at(cutoff, client.decide(&connect)).await else {
        tally.abandoned += 1;
        return;
    };
    match answered {
        Ok(verdict) => {
            tally.latencies_us.push(from.elapsed().as_micros() as u64);
            if verdict.is_allowed() {
                tally.allowed += 1;
            } else {
                tally.denied += 1;
            }
        }
        Err(_) => {
            tally.errors += 1;
            return;
        }
    }
    // A Close cut off at the end is not an error: the run is over.
    let closed = tokio::time::timeout_at(cutoff, client.decide(&Event::Close { conn })).await;
    if let Ok(Err(_)) = closed {
        tally.errors += 1;
    }
}
