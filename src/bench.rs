//! `relayrate bench`: a load generator for the `Limiter` service. Each
//! worker sends a Connect for the next of K client addresses of
//! 10.77.0.0/16, then its Close, and measures the Connect's round trip.
//! Workers share one [`BatchingClient`] per target, as a milter's sessions
//! do, so concurrent events leave in one call.

use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::engine::{ConnId, Event};
use crate::limiter_client::BatchingClient;
use crate::policy::Client;

/// A call not answered in this time counts as an error for its events.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Node URLs, comma-separated; workers are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:7450")]
    pub target: Vec<String>,
    /// Requests in flight at once.
    #[arg(long, default_value = "16")]
    pub concurrency: usize,
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
    latencies_us: Vec<u64>,
}

pub async fn run(args: BenchArgs) -> ExitCode {
    match measure(&args).await {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).expect("plain data"));
            } else {
                println!(
                    "decisions {}  allowed {}  denied {}  errors {}  {:.0}/s  p50 {} us  p99 {} us",
                    report.decisions,
                    report.allowed,
                    report.denied,
                    report.errors,
                    report.per_second,
                    report.p50_us,
                    report.p99_us
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relayrate bench: {e}");
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
    let next_key = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|w| {
            let client = clients[w % clients.len()].clone();
            let next_key = next_key.clone();
            let keys = u64::from(args.keys);
            tokio::spawn(worker(w as u64, client, next_key, keys, deadline))
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        let t = w.await.map_err(|e| e.to_string())?;
        total.allowed += t.allowed;
        total.denied += t.denied;
        total.errors += t.errors;
        total.latencies_us.extend(t.latencies_us);
    }
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
        per_second: decisions as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

async fn worker(
    w: u64,
    client: BatchingClient,
    next_key: Arc<AtomicU64>,
    keys: u64,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let i = next_key.fetch_add(1, Ordering::Relaxed) % keys;
        let conn = ConnId {
            owner: 0,
            conn: (w << 40) | n,
        };
        n += 1;
        let connect = Event::Connect {
            conn,
            client: Client::from_ip(key_address(i as u32)),
        };
        let sent = Instant::now();
        match client.decide(&connect).await {
            Ok(verdict) => {
                let allowed = verdict.is_allowed();
                tally.latencies_us.push(sent.elapsed().as_micros() as u64);
                if allowed {
                    tally.allowed += 1;
                } else {
                    tally.denied += 1;
                }
            }
            Err(_) => {
                tally.errors += 1;
                continue;
            }
        }
        if client.decide(&Event::Close { conn }).await.is_err() {
            tally.errors += 1;
        }
    }
    tally
}
