//! The relayrate server and its administrator commands.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use relayrate::check::Check;
use relayrate::milter::{self, FailMode, ListenAddr, MilterConfig, MilterListener};
use relayrate::node::{self, NodeConfig, NodeHandle, Start};
use relayrate::policy::report::{explain, explain_check, summary};
use relayrate::policy::{Client, Policy, PolicyError, PolicyFile};

/// The seed's policy, used by `relayrate run` when no --policy is given.
const DEFAULT_POLICY: &str = include_str!("../../examples/ze-policy.txt");
/// Exit code for a configuration that cannot be used (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "relayrate",
    version,
    about = "Cluster-wide outgoing-mail rate limits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check and explain ze-policy.txt files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// A node and a milter beside it: with an empty data dir, a new
    /// one-node cluster, or a new member with --join.
    Run(RunArgs),
    /// A member of a relayrate cluster.
    Node(NodeArgs),
    /// The milter an MTA calls; asks its node for verdicts.
    Milter(MilterArgs),
    /// Load generator for the Limiter service.
    Bench(relayrate::bench::BenchArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Policy files (default: the seed's policy, built in).
    #[arg(long)]
    policy: Vec<PathBuf>,
    #[arg(long, default_value = "relayrate-data")]
    data_dir: PathBuf,
    /// gRPC address (Limiter and Raft services).
    #[arg(long, default_value = "127.0.0.1:7450")]
    listen: SocketAddr,
    /// This node's id in the cluster.
    #[arg(long, default_value = "1")]
    id: u64,
    /// Address the other nodes reach this one at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Join the cluster that ADDR belongs to instead of creating one
    /// (only read when the data dir is empty).
    #[arg(long)]
    join: Option<String>,
    /// Milter socket for the MTA.
    #[arg(long, default_value = "inet:127.0.0.1:8894")]
    milter_listen: ListenAddr,
    /// Log and count refusals, refuse nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct MilterArgs {
    /// Socket for the MTA: inet:HOST:PORT or unix:PATH.
    #[arg(long, default_value = "inet:127.0.0.1:8894")]
    listen: ListenAddr,
    /// The local node's URL.
    #[arg(long, default_value = "http://127.0.0.1:7450")]
    node: String,
    /// Longest wait for a verdict before the fail mode decides.
    #[arg(long, default_value = "250")]
    timeout_ms: u64,
    /// When the node does not answer in time: local, open or tempfail.
    #[arg(long, default_value = "local")]
    fail_mode: FailMode,
    /// Relays sharing the limits (the local fail mode divides by this).
    #[arg(long, default_value = "1")]
    relays: u64,
    /// Log and count refusals, refuse nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct NodeArgs {
    /// This node's id in the cluster (a small integer, unique).
    #[arg(long)]
    id: u64,
    /// gRPC address to bind (Limiter and Raft services).
    #[arg(long)]
    listen: SocketAddr,
    /// Address the other nodes reach this one at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long)]
    data_dir: PathBuf,
    /// Policy files to put in force if the cluster's policy differs.
    #[arg(long)]
    policy: Vec<PathBuf>,
    /// Create a new cluster with this node (empty data dir only).
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Join the cluster that ADDR belongs to (empty data dir only).
    #[arg(long)]
    join: Option<String>,
    /// How long this node's open-connection leases outlive its silence.
    #[arg(long, default_value = "60")]
    lease_ttl_secs: u64,
    /// Take a snapshot (and purge the log behind it) every N log entries.
    #[arg(long, default_value = "5000")]
    snapshot_every: u64,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files (read in order; the first duplicate wins).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show, for each check, the limit that applies to a client and why.
    Explain {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Client address (IPv4 or IPv6).
        #[arg(long)]
        ip: IpAddr,
        /// Client host name, as the MTA's {client_name}.
        #[arg(long)]
        host: Option<String>,
        /// Envelope sender.
        #[arg(long)]
        from: Option<String>,
        /// SMTP AUTH user.
        #[arg(long)]
        auth: Option<String>,
        /// Print JSON: {"checks": {"ConnRate": {...}, ...}}.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let policy = if args.policy.is_empty() {
                vec![PolicyFile {
                    name: "examples/ze-policy.txt (built in)".into(),
                    text: DEFAULT_POLICY.into(),
                }]
            } else {
                match load_policy(&args.policy) {
                    Some(p) => p.files().to_vec(),
                    None => return ExitCode::from(EXIT_CONFIG),
                }
            };
            let start = args.join.map_or(Start::Bootstrap, Start::Join);
            let mut config = NodeConfig::new(args.id, args.listen, args.data_dir, start);
            config.advertise = args.advertise;
            config.policy = policy;
            let mut milter = MilterConfig::new(format!("http://{}", local_address(args.listen)));
            milter.dry_run = args.dry_run;
            serve(config, Some((args.milter_listen, milter)))
        }
        Command::Milter(args) => {
            let mut milter = MilterConfig::new(args.node);
            milter.timeout = Duration::from_millis(args.timeout_ms);
            milter.fail_mode = args.fail_mode;
            milter.relays = args.relays;
            milter.dry_run = args.dry_run;
            serve_milter(args.listen, milter)
        }
        Command::Node(args) => {
            let start = match (args.bootstrap, args.join) {
                (true, _) => Start::Bootstrap,
                (false, Some(seed)) => Start::Join(seed),
                (false, None) => Start::Resume,
            };
            let mut config = NodeConfig::new(args.id, args.listen, args.data_dir, start);
            config.advertise = args.advertise;
            config.lease_ttl = Duration::from_secs(args.lease_ttl_secs);
            config.raft.snapshot_every = args.snapshot_every;
            config.raft.keep_behind_snapshot =
                config.raft.keep_behind_snapshot.min(args.snapshot_every);
            if !args.policy.is_empty() {
                match load_policy(&args.policy) {
                    Some(p) => config.policy = p.files().to_vec(),
                    None => return ExitCode::from(EXIT_CONFIG),
                }
            }
            serve(config, None)
        }
        Command::Bench(args) => runtime().block_on(relayrate::bench::run(args)),
        Command::Policy(PolicyCommand::Check { files }) => {
            let Some(policy) = load_policy(&files) else {
                return ExitCode::FAILURE;
            };
            println!("{}", summary(&policy));
            ExitCode::SUCCESS
        }
        Command::Policy(PolicyCommand::Explain {
            files,
            ip,
            host,
            from,
            auth,
            json,
        }) => {
            let Some(policy) = load_policy(&files) else {
                return ExitCode::FAILURE;
            };
            let mut client = Client::from_ip(ip);
            if let Some(h) = host {
                client = client.with_host(&h);
            }
            if let Some(f) = from {
                client = client.with_sender(&f);
            }
            if let Some(a) = auth {
                client = client.with_auth(&a);
            }
            if json {
                let out = serde_json::to_string_pretty(&explain(&policy, &client))
                    .expect("explanation is plain data");
                print_out(&format!("{out}\n"));
            } else {
                print_explanation(&policy, &client);
            }
            ExitCode::SUCCESS
        }
    }
}

/// Where a process on this host reaches a server bound to `listen`.
fn local_address(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            (std::net::Ipv4Addr::LOCALHOST, listen.port()).into()
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            (std::net::Ipv6Addr::LOCALHOST, listen.port()).into()
        }
        _ => listen,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RELAYRATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs a node (and a milter beside it) until SIGTERM or Ctrl-C, then
/// stops them gracefully: the milter first, then the node.
fn serve(config: NodeConfig, milter: Option<(ListenAddr, MilterConfig)>) -> ExitCode {
    init_logs();
    runtime().block_on(async move {
        let handle: NodeHandle = match node::start(config).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        println!(
            "relayrate node {} listening on {}",
            handle.node.id, handle.addr
        );
        let mut milter_task = None;
        if let Some((listen, config)) = milter {
            let listener = match MilterListener::bind(&listen).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("milter: cannot listen on {listen:?}: {e}");
                    handle.shutdown().await;
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            println!("relayrate milter listening on {listen:?}");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(milter::run(listener, config, stopped));
            milter_task = Some((stop, task));
        }
        wait_for_signal().await;
        if let Some((stop, task)) = milter_task {
            let _ = stop.send(());
            let _ = task.await;
        }
        tracing::info!("stopping: draining requests");
        let raft = handle.node.raft.clone();
        handle.shutdown().await;
        let m = raft.metrics().borrow().clone();
        tracing::info!(
            term = m.current_term,
            last_log_index = ?m.last_log_index,
            last_applied = ?m.last_applied.map(|l| l.index),
            "stopped"
        );
        ExitCode::SUCCESS
    })
}

/// Runs a milter alone until SIGTERM or Ctrl-C.
fn serve_milter(listen: ListenAddr, config: MilterConfig) -> ExitCode {
    init_logs();
    runtime().block_on(async move {
        let listener = match MilterListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("milter: cannot listen on {listen:?}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        println!("relayrate milter listening on {listen:?}");
        match milter::run(listener, config, wait_for_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("milter: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Reads the policy, printing warnings, or every error as FILE:LINE:COL.
fn load_policy(files: &[PathBuf]) -> Option<Policy> {
    match Policy::from_paths(files) {
        Ok(policy) => {
            for w in policy.warnings() {
                eprintln!("{}:{}:{}: warning: {}", w.file, w.line, w.column, w.message);
            }
            Some(policy)
        }
        Err(PolicyError::Invalid(errors)) => {
            for e in errors {
                println!("{e}");
            }
            None
        }
        Err(e) => {
            println!("{e}");
            None
        }
    }
}

fn print_explanation(policy: &Policy, client: &Client) {
    use std::fmt::Write as _;
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_string());
    let mut out = format!(
        "client {} host {} sender {} auth {} class {}\n",
        client.ip.map_or("-".to_string(), |ip| ip.to_string()),
        dash(&client.host),
        dash(&client.sender),
        dash(&client.auth),
        policy.class_of(client).unwrap_or("-"),
    );
    let _ = writeln!(
        out,
        "{:<13} {:<8} {:<9} {:<32} source",
        "check", "enabled", "limit", "matched"
    );
    for check in Check::ALL {
        let e = explain_check(policy, check, client);
        let _ = writeln!(
            out,
            "{:<13} {:<8} {:<9} {:<32} {}",
            check.name(),
            if e.enabled { "yes" } else { "no" },
            e.limit.map_or("no limit".to_string(), |l| l.to_string()),
            e.matched,
            e.source.as_deref().unwrap_or("-"),
        );
    }
    print_out(&out);
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
