//! The engine's hot path with 100,000 distinct client keys, and the memory
//! each tracked (check, key) costs. See `BENCHMARKS.md` for how to run it
//! and what was measured.
//!
//! Every event is built before the timed loop, so what is timed is
//! `Engine::apply` (and dropping its verdict). Time is simulated: it moves
//! one second every `EVENTS_PER_SECOND` events, so buckets roll and the
//! engine's once-a-bucket idle sweep runs as it would in real use.
//!
//! The memory figures come from a counting global allocator: the heap bytes
//! that filling a fresh engine leaves live (as glibc's malloc holds them,
//! and as asked of it), over the counters the engine then holds. They are
//! printed before the timed benches, on lines starting with `memory:`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use relayrate::engine::{ConnId, Engine, Event, Time, Verdict};
use relayrate::policy::{Client, Policy};

/// Counts, while `COUNTING` is on, the live heap bytes asked for, the
/// bytes the C allocator holds for them, and the live blocks.
struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ASKED: AtomicIsize = AtomicIsize::new(0);
static HELD: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

fn counting() -> bool {
    COUNTING.load(Ordering::Relaxed)
}

fn note(asked: isize, held: isize, blocks: isize) {
    ASKED.fetch_add(asked, Ordering::Relaxed);
    HELD.fetch_add(held, Ordering::Relaxed);
    BLOCKS.fetch_add(blocks, Ordering::Relaxed);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn malloc_usable_size(ptr: *mut std::ffi::c_void) -> usize;
}

/// The bytes the allocator holds for a live block of `size` bytes: with
/// glibc, its usable size and the 8-byte header of the chunk; elsewhere
/// just `size`.
///
/// # Safety
/// `ptr` must be a live block from `System`.
#[allow(unused_variables)]
unsafe fn held(ptr: *mut u8, size: usize) -> isize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `System` allocates with glibc's malloc; `ptr` is live.
    let size = unsafe { malloc_usable_size(ptr.cast()) } + 8;
    size as isize
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are
// added around it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && counting() {
            // SAFETY: `p` was just allocated by `System`.
            note(layout.size() as isize, unsafe { held(p, layout.size()) }, 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && counting() {
            // SAFETY: `p` was just allocated by `System`.
            note(layout.size() as isize, unsafe { held(p, layout.size()) }, 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counting() {
            // SAFETY: `ptr` is live until the `dealloc` below.
            note(
                -(layout.size() as isize),
                -unsafe { held(ptr, layout.size()) },
                -1,
            );
        }
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is live until the `realloc` below.
        let before = counting().then(|| unsafe { held(ptr, layout.size()) });
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if let (false, Some(before)) = (p.is_null(), before) {
            // SAFETY: `p` was just allocated by `System`.
            let after = unsafe { held(p, new_size) };
            note(
                new_size as isize - layout.size() as isize,
                after - before,
                0,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Distinct client keys in every bench.
const KEYS: usize = 100_000;
/// Simulated event rate: with 100k keys, each key sees an event about every
/// 10 s (60 in a 600 s window); a bucket (30 s) rolls every 300k events.
const EVENTS_PER_SECOND: u64 = 10_000;
/// The simulated clock's start, at a bucket boundary.
const START: Time = 1_750_000_020;
/// Warm-up events: a whole window (600 s) and a bit of simulated time.
const WARM: u64 = 610 * EVENTS_PER_SECOND;
/// Connections held open at once in the connect/close bench.
const OPEN_AT_ONCE: usize = 1_000;

/// Limits high enough that every event of the benches is allowed. All six
/// switches on; /32, /24 and /14 entries (three prefix lengths to probe);
/// a /16 NetClass; sender entries; defaults.
const POLICY: &str = "\
CHECK_CONN_RATE         YES
CHECK_OPEN_CONNECTIONS  YES
CHECK_NB_RCPT           YES
CHECK_MSG_RATE          YES
CHECK_NB_MSGS           YES
CHECK_RCPT_RATE         YES
NetClass:192.168.0.0/16 lan
ConnRate:1.1.1.11       50
ConnRate:1.1.1          500
ConnRate:10.76.0.0/14   1m
ConnRate:default        1m
ConnOpen:1.1.1.11       5
ConnOpen:10.76.0.0/14   10k
ConnOpen:default        100
MaxRcpt:lan             100
MaxRcpt:default         1k
MsgRate:1.1.1.11        40
MsgRate:1.1.1           400
MsgRate:10.76.0.0/14    1m
MsgRate:default         1m
MaxMsgs:default         1k
RcptRate:1.1.1.11       200
RcptRate:1.1.1          2k
RcptRate:10.76.0.0/14   1m
RcptRate:default        1m
MsgRateFrom:@example.com 1m
MsgRateFrom:default     1m
RcptRateFrom:default    1m
MaxRcptFrom:default     1k
";

/// The same, with a RcptRate of 20 in 600 s for 10.76/14: at 60 recipients
/// per key per window, every Rcpt is refused once the window has filled.
fn refusing_policy() -> String {
    POLICY.replace("RcptRate:10.76.0.0/14   1m", "RcptRate:10.76.0.0/14   20")
}

fn policy(text: &str) -> Arc<Policy> {
    Arc::new(Policy::parse_str("bench-policy.txt", text).expect("bench policy parses"))
}

/// Client `i`: 10.76.0.0 + i, inside 10.76.0.0/14 for `i` < 262,144.
fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from_bits(
        Ipv4Addr::new(10, 76, 0, 0).to_bits() + i as u32,
    ))
}

fn clients() -> Vec<Client> {
    (0..KEYS).map(|i| Client::from_ip(ip(i))).collect()
}

/// Clients with a distinct address and a distinct envelope sender each.
fn sender_clients(n: usize, with_ip: bool) -> Vec<Client> {
    (0..n)
        .map(|i| {
            let base = if with_ip {
                Client::from_ip(ip(i))
            } else {
                Client::default()
            };
            base.with_sender(&format!("user{i}@host{}.example.com", i % 1000))
        })
        .collect()
}

fn messages(clients: &[Client]) -> Vec<Event> {
    clients
        .iter()
        .map(|c| Event::Mail {
            client: c.clone(),
            msgs_in_conn: 1,
        })
        .collect()
}

fn rcpts(clients: &[Client]) -> Vec<Event> {
    clients
        .iter()
        .map(|c| Event::Rcpt {
            client: c.clone(),
            rcpts_in_msg: 1,
        })
        .collect()
}

fn conn(i: usize) -> ConnId {
    ConnId {
        owner: 1,
        conn: i as u64,
    }
}

/// Connect of client `i`, then Close of the connection opened
/// `OPEN_AT_ONCE` connects earlier, so that many leases stay open.
fn connect_close(clients: &[Client]) -> Vec<Event> {
    let n = clients.len();
    (0..n)
        .flat_map(|i| {
            [
                Event::Connect {
                    conn: conn(i),
                    client: clients[i].clone(),
                },
                Event::Close {
                    conn: conn((i + n - OPEN_AT_ONCE) % n),
                },
            ]
        })
        .collect()
}

/// A whole session per client: Connect, Mail (which reserves the message's
/// slot), two Rcpt, Close.
fn sessions(clients: &[Client]) -> Vec<Event> {
    clients
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            [
                Event::Connect {
                    conn: conn(i),
                    client: c.clone(),
                },
                Event::Mail {
                    client: c.clone(),
                    msgs_in_conn: 1,
                },
                Event::Rcpt {
                    client: c.clone(),
                    rcpts_in_msg: 1,
                },
                Event::Rcpt {
                    client: c.clone(),
                    rcpts_in_msg: 2,
                },
                Event::Close { conn: conn(i) },
            ]
        })
        .collect()
}

/// An engine and the events it is fed, over and over, at a simulated time.
struct Run {
    engine: Engine,
    script: Vec<Event>,
    next: usize,
    steps: u64,
    /// Whether the clock moves; a read-only bench keeps it still so that
    /// the counters it reads stay in the window.
    clock_moves: bool,
}

impl Run {
    fn new(policy: Arc<Policy>, script: Vec<Event>, clock_moves: bool) -> Run {
        Run {
            engine: Engine::new(policy),
            script,
            next: 0,
            steps: 0,
            clock_moves,
        }
    }

    fn now(&self) -> Time {
        if self.clock_moves {
            START + self.steps / EVENTS_PER_SECOND
        } else {
            START
        }
    }

    #[inline]
    fn step(&mut self) -> Verdict {
        let verdict = self.engine.apply(&self.script[self.next], self.now());
        self.steps += 1;
        self.next += 1;
        if self.next == self.script.len() {
            self.next = 0;
        }
        verdict
    }

    /// Applies `events` events outside the timed loop: every key is then
    /// tracked and, once past a whole window, counts are at their steady
    /// state.
    fn warm(mut self, events: u64) -> Run {
        // Under `cargo test --benches` each bench runs once: a smoke test.
        let events = if smoke_test() {
            self.script.len() as u64
        } else {
            events
        };
        for _ in 0..events {
            self.step();
        }
        self
    }

    /// The share of refusals over one more pass of the script.
    fn refused_share(&mut self) -> f64 {
        let n = self.script.len();
        let refused = (0..n).filter(|_| !self.step().is_allowed()).count();
        refused as f64 / n as f64
    }
}

/// Whether criterion runs the benches once each, as tests (its rule: no
/// `--bench`, or `--test`).
fn smoke_test() -> bool {
    let has = |flag: &str| std::env::args().any(|a| a == flag);
    !has("--bench") || has("--test")
}

/// A fresh engine that has applied `prefill` at `START`.
/// Times `Engine::apply` one event at a time. The run is built (and
/// warmed) only if the bench is selected by criterion's filter.
fn bench_run(c: &mut Criterion, name: &str, build: impl FnOnce() -> Run) {
    let mut build = Some(build);
    let mut run = None;
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        let run = run.get_or_insert_with(|| build.take().expect("built once")());
        b.iter(|| black_box(run.step()))
    });
    group.finish();
    if let Some(mut run) = run {
        let refused = run.refused_share();
        println!(
            "{name}: {} counters, {} leases after {} events ({} simulated s); \
             {:.1}% of one more pass refused",
            run.engine.counters_len(),
            run.engine.leases_len(),
            run.steps,
            run.now() - START,
            100.0 * refused,
        );
    }
}

fn hot_path(c: &mut Criterion) {
    let allowing = policy(POLICY);
    let refusing = policy(&refusing_policy());
    let ips = clients();
    let senders = sender_clients(KEYS, true);

    // A MAIL FROM by client address: MaxMsgs and the message rates
    // decided, the message's MsgRate slot reserved.
    bench_run(c, "message_100k_keys", || {
        Run::new(allowing.clone(), messages(&ips), true).warm(WARM)
    });

    // MsgRate by address and MsgRateFrom by sender: the string-key path.
    bench_run(c, "message_sender_100k_keys", || {
        Run::new(allowing.clone(), messages(&senders), true).warm(WARM)
    });

    // RcptRate counted; ConnRate, ConnOpen, MaxRcpt, MaxRcptFrom and the
    // three recipient rates decided.
    bench_run(c, "rcpt_100k_keys", || {
        Run::new(allowing.clone(), rcpts(&ips), true).warm(WARM)
    });

    // The same where the rate is exceeded: a refusal (with its retry-after)
    // is built.
    bench_run(c, "rcpt_refused_100k_keys", || {
        Run::new(refusing.clone(), rcpts(&ips), true).warm(WARM)
    });

    // Connect (ConnRate counted, lease taken, both decided) and Close.
    bench_run(c, "connect_close_100k_keys", || {
        Run::new(allowing.clone(), connect_close(&ips), true).warm(WARM)
    });

    // Whole sessions: Connect, Mail, Rcpt, Rcpt, Close.
    bench_run(c, "session_mix_100k_keys", || {
        Run::new(allowing.clone(), sessions(&ips), true).warm(WARM)
    });
}

/// Four of the benches with baselines on (the bench policy leaves the
/// defaults) and off (`UnusualFactor 0`: no learning, no flag to trip),
/// each pair run one right after the other, so that both halves of a pair
/// see the same load on a shared machine.
fn baselines_on_off(c: &mut Criterion) {
    let on = policy(POLICY);
    let off = policy(&format!("{POLICY}UnusualFactor 0\n"));
    let ips = clients();
    type Make = fn(&[Client]) -> Vec<Event>;
    let benches: [(&str, Make); 4] = [
        ("message_100k_keys", messages),
        ("rcpt_100k_keys", rcpts),
        ("connect_close_100k_keys", connect_close),
        ("session_mix_100k_keys", sessions),
    ];
    for (name, make) in benches {
        for (state, policy) in [("on", &on), ("off", &off)] {
            bench_run(c, &format!("{name}_baselines_{state}"), || {
                Run::new(policy.clone(), make(&ips), true).warm(WARM)
            });
        }
    }
}

/// The live heap bytes a fresh engine holds after applying `events` at
/// one instant and again a window later (when each key's baseline
/// catches up and keeps its first hourly peak), and the engine.
fn filled(policy: &Arc<Policy>, events: &[Event]) -> (isize, Engine) {
    let mut engine = Engine::new(policy.clone());
    HELD.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for now in [START, START + 600] {
        for e in events {
            black_box(engine.apply(e, now));
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    (HELD.load(Ordering::SeqCst), engine)
}

/// Fills a fresh engine with `events` with baselines on (each key gets
/// its baseline at its first event, and its hourly peaks at the next
/// catch-up) and another with them off, and prints the difference in live
/// heap bytes per baseline, and per million keys.
fn measure_baselines(label: &str, events: &[Event]) {
    let (on, engine) = filled(&policy(POLICY), events);
    let (off, without) = filled(&policy(&format!("{POLICY}UnusualFactor 0\n")), events);
    let n = engine.baselines_len().max(1) as f64;
    let per = (on - off) as f64 / n;
    println!(
        "memory: {per:.0} bytes per baseline over {} baselines [{label}]; \
         {per:.0} MB per million keys",
        engine.baselines_len(),
    );
    drop(black_box((engine, without)));
}

/// Fills a fresh engine with `events` at one instant and prints the live
/// heap bytes it then holds per (check, key) counter.
fn measure(label: &str, policy: &Arc<Policy>, events: &[Event]) {
    let mut engine = Engine::new(policy.clone());
    for n in [&ASKED, &HELD, &BLOCKS] {
        n.store(0, Ordering::SeqCst);
    }
    COUNTING.store(true, Ordering::SeqCst);
    for e in events {
        black_box(engine.apply(e, START));
    }
    COUNTING.store(false, Ordering::SeqCst);
    let [asked, held, blocks] = [&ASKED, &HELD, &BLOCKS].map(|n| n.load(Ordering::SeqCst));
    let n = engine.counters_len().max(1) as f64;
    println!(
        "memory: {:.0} bytes per tracked (check, key) over {} counters [{label}]: \
         {:.0} B asked of the allocator + {:.0} B malloc overhead, {:.2} heap blocks",
        held as f64 / n,
        engine.counters_len(),
        asked as f64 / n,
        (held - asked) as f64 / n,
        blocks as f64 / n,
    );
    drop(black_box(engine));
}

fn memory(_: &mut Criterion) {
    // The counters alone: baselines are measured apart, below.
    let allowing = policy(&format!("{POLICY}UnusualFactor 0\n"));
    let ips = clients();
    let senders = sender_clients(KEYS, false);
    measure("IP keys, 1 check (MsgRate)", &allowing, &messages(&ips));
    let three: Vec<Event> = (0..KEYS)
        .flat_map(|i| {
            let c = &ips[i];
            [
                Event::Connect {
                    conn: conn(i),
                    client: c.clone(),
                },
                Event::Close { conn: conn(i) },
                Event::Mail {
                    client: c.clone(),
                    msgs_in_conn: 1,
                },
                Event::Rcpt {
                    client: c.clone(),
                    rcpts_in_msg: 1,
                },
            ]
        })
        .collect();
    measure(
        "IP keys, 3 checks (ConnRate, MsgRate, RcptRate)",
        &allowing,
        &three,
    );
    measure(
        "sender keys, 1 check (MsgRateFrom), senders of 23-29 bytes",
        &allowing,
        &messages(&senders),
    );
    // Just past a growth of the counter table: its emptiest point, the most
    // bytes per counter. hashbrown fills a table of 2^k buckets to 7/8; the
    // 114,689th entry (7/8 x 131,072 + 1) doubles it to 262,144 buckets.
    let worst = 114_689;
    let many_ips: Vec<Client> = (0..worst).map(|i| Client::from_ip(ip(i))).collect();
    measure(
        "IP keys, 1 check, 114,689 keys: table just grown",
        &allowing,
        &messages(&many_ips),
    );
    measure(
        "sender keys, 1 check, 114,689 keys: table just grown",
        &allowing,
        &messages(&sender_clients(worst, false)),
    );
    measure_baselines("IP keys, 1 check (MsgRate)", &messages(&ips));
    measure_baselines(
        "sender keys, 1 check (MsgRateFrom), senders of 23-29 bytes",
        &messages(&senders),
    );
    measure_baselines(
        "IP keys, 1 check, 114,689 keys: table just grown",
        &messages(&many_ips),
    );
}

/// The copy of the engine's state that a Raft snapshot takes while it
/// holds the state's lock (decisions that write wait meanwhile): 100k IP
/// keys, each with its MsgRate counter and, with baselines on, its
/// baseline and hourly peaks; and the same with baselines off. With them
/// on, also what `relayratectl suggest` collects under that lock.
fn snapshot_copy(c: &mut Criterion) {
    let events = messages(&clients());
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    for (state, text) in [
        ("on", POLICY.to_string()),
        ("off", format!("{POLICY}UnusualFactor 0\n")),
    ] {
        let (_, engine) = filled(&policy(&text), &events);
        group.bench_function(format!("state_100k_keys_baselines_{state}"), |b| {
            b.iter(|| black_box(engine.state()))
        });
        if state == "on" {
            // What the Admin Suggest RPC collects under the same lock.
            group.bench_function("hourly_peaks_100k_keys", |b| {
                b.iter(|| {
                    let shared: Vec<_> = engine
                        .hourly_peaks()
                        .map(|(id, peaks)| (id.clone(), peaks))
                        .collect();
                    black_box(shared)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, memory, hot_path, baselines_on_off, snapshot_copy);
criterion_main!(benches);
