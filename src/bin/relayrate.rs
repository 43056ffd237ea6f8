//! The relayrate server and its administrator commands.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[path = "relayrate/history_cli.rs"]
mod history_cli;
use relayrate::check::Check;
use relayrate::dashboard::Dashboard;
use relayrate::milter::{self, FailMode, ListenAddr, MilterConfig, MilterListener};
use relayrate::node::{self, NodeConfig, NodeHandle, Start};
use relayrate::policy::report::{explain, explain_check, summary};
use relayrate::policy::{Client, Policy, PolicyError, PolicyFile};
use relayrate::raft::peer_auth::ClusterSecret;
use relayrate::terminal::{escape_json, print_err, print_out, Escaped};
use relayrate::tls::Tls;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The seed's policy, used by `relayrate run` when no --policy is given.
const DEFAULT_POLICY: &str = include_str!("../../examples/ze-policy.txt");
/// Exit code for a configuration that cannot be used (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// The node's Raft core stopped (a storage error, such as a full disk, or
/// a bug): the supervisor starts the process again.
const EXIT_RAFT_STOPPED: u8 = 70;
/// Where `relayrate run` serves its metrics unless told otherwise.
const DEFAULT_METRICS: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9450);

#[derive(Parser)]
#[command(
    name = "relayrate",
    version,
    about = "Cluster-wide outgoing-mail rate limits"
)]
struct Cli {
    /// Log lines as text for people, or as JSON objects for collectors.
    #[arg(long, global = true, default_value = "human")]
    log_format: LogFormat,
    /// Threads that do the work. One costs the least CPU a message: tasks
    /// hand work to each other without waking another thread (see
    /// BENCHMARKS.md); more serve more messages a second on a busy node.
    #[arg(long, global = true, default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// What a serving node is reached and guarded by, beyond its address.
#[derive(Args)]
struct ServerOptions {
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// TLS: this node's certificate (PEM), presented to clients and peers.
    #[arg(long, requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// TLS: the private key of --tls-cert (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_client_ca"])]
    tls_key: Option<PathBuf>,
    /// TLS: the CA that signs client and peer certificates; others are refused.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_client_ca: Option<PathBuf>,
    /// Admin writes (reset, policy apply, add/remove node) need this token;
    /// so do joining and policy changes forwarded between nodes.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Peer listener (the Raft service, for the other nodes only; default:
    /// the --listen address, port + 10).
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
}

/// A milter's TLS to its node.
#[derive(Args)]
struct MilterTls {
    /// CA of the node's certificate; turns TLS on.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate to present to the node (PEM).
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
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
    /// Replay mail logs through a policy: what it would have refused.
    Replay(ReplayArgs),
    /// Print a ze-policy.txt with limits chosen from mail logs.
    Suggest(SuggestArgs),
}

#[derive(Args)]
struct LogArgs {
    /// Mail logs (Postfix or sendmail; plain or gzipped), oldest first.
    #[arg(long = "maillog", required = true, num_args = 1..)]
    maillog: Vec<PathBuf>,
    /// The year of the first classic (year-less) time stamp of each log
    /// [default: the year of the file's last change].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1970..=9999))]
    year: Option<i32>,
}

#[derive(Args)]
struct ReplayArgs {
    /// The policy to replay.
    #[arg(long, required = true, num_args = 1..)]
    policy: Vec<PathBuf>,
    #[command(flatten)]
    logs: LogArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SuggestArgs {
    #[command(flatten)]
    logs: LogArgs,
    /// The share of each key's windows that may see a refusal (0 to 1).
    #[arg(long, default_value_t = 0.01, value_parser = relayrate::history::suggest::parse_share)]
    delay_share: f64,
}

#[derive(Args)]
struct RunArgs {
    /// Policy files to put in force if the cluster's policy differs
    /// (default: a new cluster starts with the seed's policy, built in; a
    /// restart keeps the cluster's policy).
    #[arg(long)]
    policy: Vec<PathBuf>,
    #[arg(long, default_value = "relayrate-data")]
    data_dir: PathBuf,
    /// Client gRPC address (Limiter, Admin, health; peers use --peer-listen).
    #[arg(long, default_value = "127.0.0.1:7450")]
    listen: SocketAddr,
    /// This node's id in the cluster.
    #[arg(long, default_value = "1")]
    id: u64,
    /// Address the other nodes reach this one's peer listener at
    /// (default: the peer listener's).
    #[arg(long)]
    advertise: Option<String>,
    /// Join the cluster that ADDR (a member's peer listener) belongs to
    /// instead of creating one (only read when the data dir is empty);
    /// several members may be given, separated by commas. Needs the
    /// cluster's secret (--cluster-secret-file).
    #[arg(long)]
    join: Option<String>,
    /// The secret every node of the cluster shares, which authenticates
    /// peers (default: DATA_DIR/cluster-secret, created if missing).
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// Milter socket for the MTA.
    #[arg(long, default_value = "inet:127.0.0.1:8894")]
    milter_listen: ListenAddr,
    /// Log and count refusals, refuse nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    milter_limits: milter::LimitArgs,
    #[command(flatten)]
    server: ServerOptions,
}

/// The milter a `relayrate node` may serve beside itself, asking the node
/// in-process.
#[derive(Args)]
struct NodeMilter {
    /// Also serve the milter for the MTA on this socket (inet:HOST:PORT
    /// or unix:PATH); it asks this node in-process, with no gRPC hop.
    #[arg(long)]
    milter_listen: Option<ListenAddr>,
    /// Longest wait for a verdict before the fail mode decides.
    #[arg(long, default_value = "250", requires = "milter_listen")]
    milter_timeout_ms: u64,
    /// When the node does not answer in time: local, open or tempfail.
    #[arg(long, default_value = "local", requires = "milter_listen")]
    milter_fail_mode: FailMode,
    /// Relays sharing the limits (the local fail mode divides by this).
    #[arg(long, default_value = "1", requires = "milter_listen")]
    relays: u64,
    /// Log and count refusals, refuse nothing.
    #[arg(long, requires = "milter_listen")]
    dry_run: bool,
    #[command(flatten)]
    milter_limits: milter::LimitArgs,
}

impl NodeMilter {
    fn config(&self) -> Option<(ListenAddr, MilterConfig)> {
        let listen = self.milter_listen.clone()?;
        let mut milter = MilterConfig::new("in-process");
        milter.timeout = Duration::from_millis(self.milter_timeout_ms);
        milter.fail_mode = self.milter_fail_mode;
        milter.relays = self.relays;
        milter.dry_run = self.dry_run;
        milter.limits = self.milter_limits.limits();
        Some((listen, milter))
    }
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
    /// Policy file (repeatable) the local fail mode decides with until the
    /// node's policy has been fetched; without it, the local fail mode
    /// tempfails until then. Checked at start: a bad file is an error.
    #[arg(long)]
    policy: Vec<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    tls: MilterTls,
    #[command(flatten)]
    limits: milter::LimitArgs,
}

#[derive(Args)]
struct NodeArgs {
    /// This node's id in the cluster (a small integer, unique).
    #[arg(long)]
    id: u64,
    /// Client gRPC address to bind (Limiter, Admin, health; peers use
    /// --peer-listen).
    #[arg(long)]
    listen: SocketAddr,
    /// Address the other nodes reach this one's peer listener at
    /// (default: the peer listener's).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long)]
    data_dir: PathBuf,
    /// The secret every node of the cluster shares, which authenticates
    /// peers (with TLS, peers are also known by their certificates).
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// Policy files to put in force if the cluster's policy differs
    /// (at each start: it wins over a policy applied since, loudly).
    /// Without it the node keeps the cluster's policy.
    #[arg(long)]
    policy: Vec<PathBuf>,
    /// Create a new cluster with this node (empty data dir only).
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Join the cluster that ADDR (a member's peer listener) belongs to
    /// (empty data dir only); several members may be given, separated by
    /// commas.
    #[arg(long)]
    join: Option<String>,
    /// How long this node's open-connection leases outlive its silence.
    #[arg(long, default_value = "60")]
    lease_ttl_secs: u64,
    /// Take a snapshot (and purge the log behind it) every N log entries.
    #[arg(long, default_value = "5000")]
    snapshot_every: u64,
    #[command(flatten)]
    milter: NodeMilter,
    #[command(flatten)]
    server: ServerOptions,
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
    init_logs(cli.log_format);
    let threads = cli.threads;
    match cli.command {
        Command::Run(args) => {
            // Without --policy, the built-in policy starts a new cluster;
            // a restart keeps the cluster's (one applied since included).
            let policy = if args.policy.is_empty() {
                Vec::new()
            } else {
                match load_policy(&args.policy) {
                    Some(p) => p.files().to_vec(),
                    None => return ExitCode::from(EXIT_CONFIG),
                }
            };
            let start = args.join.map_or(Start::Bootstrap, Start::Join);
            let secret_file = args
                .cluster_secret_file
                .unwrap_or_else(|| args.data_dir.join("cluster-secret"));
            let mut config = NodeConfig::new(args.id, args.listen, args.data_dir, start);
            config.advertise = args.advertise;
            config.policy = policy;
            config.default_policy = vec![PolicyFile {
                name: "examples/ze-policy.txt (built in)".into(),
                text: DEFAULT_POLICY.into(),
            }];
            if let Err(e) = secure(&mut config, &args.server) {
                print_err(&format!("relayrate: {}\n", Escaped(e)));
                return ExitCode::from(EXIT_CONFIG);
            }
            warn_if_readable_by_others(&secret_file);
            match ClusterSecret::read_or_create(&secret_file) {
                Ok(secret) => config.cluster_secret = Some(secret),
                Err(e) => {
                    print_err(&format!("relayrate: {}\n", Escaped(e)));
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
            let mut milter = MilterConfig::new(format!("http://{}", local_address(args.listen)));
            milter.dry_run = args.dry_run;
            milter.limits = args.milter_limits.limits();
            // The milter beside the node presents the node's own certificate.
            milter.tls = config.tls.clone();
            let metrics = args.server.metrics_listen.or(Some(DEFAULT_METRICS));
            let serving = Serving {
                policy_paths: args.policy,
                metrics,
                threads,
            };
            serve(config, Some((args.milter_listen, milter)), serving)
        }
        Command::Milter(args) => {
            let mut milter = MilterConfig::new(args.node);
            if !args.policy.is_empty() {
                match load_policy(&args.policy) {
                    Some(policy) => milter.fallback_policy = Some(policy),
                    None => return ExitCode::from(EXIT_CONFIG),
                }
            }
            milter.timeout = Duration::from_millis(args.timeout_ms);
            milter.fail_mode = args.fail_mode;
            milter.relays = args.relays;
            milter.dry_run = args.dry_run;
            milter.limits = args.limits.limits();
            if let Some(ca) = &args.tls.tls_ca {
                let identity = args
                    .tls
                    .tls_cert
                    .as_deref()
                    .zip(args.tls.tls_key.as_deref());
                match Tls::client(ca, identity) {
                    Ok(tls) => milter.tls = Some(tls),
                    Err(e) => {
                        print_err(&format!("relayrate: {}\n", Escaped(e)));
                        return ExitCode::from(EXIT_CONFIG);
                    }
                }
            }
            serve_milter(args.listen, milter, args.metrics_listen, threads)
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
            if let Err(e) = secure(&mut config, &args.server) {
                print_err(&format!("relayrate: {}\n", Escaped(e)));
                return ExitCode::from(EXIT_CONFIG);
            }
            if let Some(path) = &args.cluster_secret_file {
                warn_if_readable_by_others(path);
                match ClusterSecret::read(path) {
                    Ok(secret) => config.cluster_secret = Some(secret),
                    Err(e) => {
                        print_err(&format!("relayrate: {}\n", Escaped(e)));
                        return ExitCode::from(EXIT_CONFIG);
                    }
                }
            }
            let serving = Serving {
                policy_paths: args.policy,
                metrics: args.server.metrics_listen,
                threads,
            };
            serve(config, args.milter.config(), serving)
        }
        Command::Bench(args) => block_on(threads, relayrate::bench::run(args)),
        Command::Replay(args) => {
            history_cli::replay(&args.policy, &args.logs.maillog, args.logs.year, args.json)
        }
        Command::Suggest(args) => {
            history_cli::suggest(&args.logs.maillog, args.logs.year, args.delay_share)
        }
        Command::Policy(PolicyCommand::Check { files }) => {
            let Some(policy) = load_policy(&files) else {
                return ExitCode::FAILURE;
            };
            print_out(&format!("{}\n", Escaped(summary(&policy))));
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
                print_out(&format!("{}\n", escape_json(&out)));
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

/// A runtime of `threads` threads. With one, everything runs on the
/// calling thread, with no hand-overs.
fn runtime(threads: u16) -> tokio::runtime::Runtime {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
    };
    builder.enable_all().build().expect("tokio runtime")
}

/// Runs `work` to its end on a [`runtime`]; then leaves at once, even if
/// a blocking task (a name lookup, a file) still runs.
fn block_on(threads: u16, work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let rt = runtime(threads);
    let code = rt.block_on(work);
    rt.shutdown_timeout(Duration::from_millis(500));
    code
}

fn init_logs(format: LogFormat) {
    relayrate::logs::init(matches!(format, LogFormat::Json));
}

/// Says so when a secret file of this process's user may be read by
/// others (who could then speak as a member of the cluster). A file of
/// another owner (a Kubernetes Secret mounted read-only) is not ours to
/// change.
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 && Some(meta.uid()) == me {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the cluster secret may be read by others than its owner: chmod 600"
            );
        }
    }
}

/// Reads the TLS files and the admin token named on the command line.
fn secure(config: &mut NodeConfig, options: &ServerOptions) -> Result<(), String> {
    config.tls = Tls::from_options(
        options.tls_cert.clone(),
        options.tls_key.clone(),
        options.tls_client_ca.clone(),
    )
    .map_err(|e| e.to_string())?;
    config.peer_listen = options.peer_listen;
    if let Some(path) = &options.admin_token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(format!("{}: the admin token is empty", path.display()));
        }
        config.admin_token = Some(token.to_string());
    }
    Ok(())
}

/// What a serving process does besides its node and milter.
struct Serving {
    /// Re-read on SIGHUP.
    policy_paths: Vec<PathBuf>,
    metrics: Option<SocketAddr>,
    threads: u16,
}

/// Starts the metrics endpoint, if asked, with a node's dashboard; false
/// if it cannot listen.
async fn start_metrics(listen: Option<SocketAddr>, dashboard: Option<Arc<Dashboard>>) -> bool {
    let Some(listen) = listen else {
        return true;
    };
    let with_dashboard = dashboard.is_some();
    match relayrate::metrics::serve(listen, dashboard).await {
        Ok(addr) => {
            print_out(&format!("relayrate metrics on http://{addr}/metrics\n"));
            if with_dashboard {
                print_out(&format!("relayrate dashboard on http://{addr}/\n"));
            }
            true
        }
        Err(e) => {
            tracing::error!("metrics: cannot listen on {listen}: {e}");
            false
        }
    }
}

/// Runs a node (and a milter beside it) until SIGTERM or Ctrl-C, then
/// stops them gracefully: the milter first, then the node. SIGHUP
/// re-reads the policy files and puts them in force.
fn serve(
    config: NodeConfig,
    milter: Option<(ListenAddr, MilterConfig)>,
    serving: Serving,
) -> ExitCode {
    if !config.listen.ip().is_loopback() {
        if config.tls.is_none() {
            tracing::warn!(
                listen = %config.listen,
                "gRPC ports off loopback without TLS: verdicts, admin tokens and peer traffic \
                 cross the network in clear (see --tls-cert)"
            );
        }
        if config.admin_token.is_none() {
            tracing::warn!("admin writes need no token (see --admin-token-file)");
        }
    }
    block_on(serving.threads, async move {
        // First of all: from here on a stop signal is heard, even while
        // the node starts, joins or waits for its policy.
        let listened = Stop::listen().and_then(|s| Ok((s, signal(SignalKind::hangup())?)));
        let (mut stop, mut hangup) = match listened {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for signals: {e}");
                return ExitCode::FAILURE;
            }
        };
        let dashboard = Dashboard::new(config.admin_token.clone(), config.tls.is_some());
        if !start_metrics(serving.metrics, Some(dashboard.clone())).await {
            return ExitCode::from(EXIT_CONFIG);
        }
        let started = tokio::select! {
            started = node::start(config) => started,
            () = stop.recv() => {
                tracing::info!("stopped while starting");
                return ExitCode::SUCCESS;
            }
        };
        let handle: NodeHandle = match started {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        print_out(&format!(
            "relayrate node {} listening on {} (peers on {})\n",
            handle.node.id, handle.addr, handle.peer_addr
        ));
        dashboard.attach(handle.node.clone());
        let gauges = tokio::spawn(relayrate::metrics::watch_node(
            handle.node.clone(),
            Duration::from_secs(1),
        ));
        let mut milter_task = None;
        if let Some((listen, mut config)) = milter {
            // The milter beside the node asks it in-process.
            config.in_process = Some(handle.node.clone());
            let listener = match MilterListener::bind(&listen).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("milter: cannot listen on {listen}: {e}");
                    handle.shutdown().await;
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            print_out(&format!("relayrate milter listening on {listen}\n"));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(milter::run(listener, config, stopped));
            milter_task = Some((stop, task));
        }
        let node = handle.node.clone();
        let raft_stopped = loop {
            tokio::select! {
                () = stop.recv() => break None,
                why = node.wait_raft_stopped() => break Some(why),
                Some(()) = hangup.recv() => tokio::select! {
                    () = reload(&handle.node, &serving.policy_paths) => {}
                    () = stop.recv() => break None,
                },
            }
        };
        if let Some(why) = raft_stopped {
            // Nothing to hand over or flush: out at once, for the
            // supervisor to start the node again (it waits for room in
            // its data dir if the disk is full).
            if let Some((stop, task)) = milter_task {
                let _ = stop.send(());
                task.abort();
            }
            gauges.abort();
            tracing::error!(reason = %why, "exiting: the Raft core stopped");
            handle.kill().await;
            return ExitCode::from(EXIT_RAFT_STOPPED);
        }
        let drain = async {
            if let Some((stop, task)) = milter_task {
                let _ = stop.send(());
                let _ = task.await;
            }
            gauges.abort();
            tracing::info!("stopping: draining requests");
            let raft = handle.node.raft.clone();
            handle.shutdown().await;
            let m = raft.metrics().borrow().clone();
            tracing::info!(
                term = m.current_term,
                last_log_index = m.last_log_index.unwrap_or(0),
                last_applied = m.last_applied.map_or(0, |l| l.index),
                "stopped"
            );
        };
        tokio::select! {
            () = drain => ExitCode::SUCCESS,
            () = stop.recv() => {
                tracing::warn!("stopped at once: a second signal cut the drain short");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGHUP: re-reads the policy files; a bad file is logged with its
/// FILE:LINE:COL errors and the policy in force stays.
async fn reload(node: &relayrate::node::Node, paths: &[PathBuf]) {
    if paths.is_empty() {
        tracing::info!("SIGHUP: no --policy file to re-read");
        return;
    }
    let policy = match Policy::from_paths(paths) {
        Ok(p) => p,
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!("SIGHUP: policy not reloaded: {line}");
            }
            return;
        }
    };
    // The same warnings as `relayrate policy check` prints.
    for w in policy.warning_lines() {
        tracing::warn!("SIGHUP: {w}");
    }
    match node.put_policy(policy.files().to_vec()).await {
        Ok(true) => tracing::info!("SIGHUP: policy reloaded and in force"),
        Ok(false) => tracing::info!("SIGHUP: policy unchanged"),
        Err(e) => tracing::error!("SIGHUP: policy not reloaded: {e}"),
    }
}

/// Runs a milter alone until SIGTERM or Ctrl-C.
fn serve_milter(
    listen: ListenAddr,
    config: MilterConfig,
    metrics: Option<SocketAddr>,
    threads: u16,
) -> ExitCode {
    block_on(threads, async move {
        let mut stop = match Stop::listen() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for signals: {e}");
                return ExitCode::FAILURE;
            }
        };
        if !start_metrics(metrics, None).await {
            return ExitCode::from(EXIT_CONFIG);
        }
        let listener = match MilterListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("milter: cannot listen on {listen}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        print_out(&format!("relayrate milter listening on {listen}\n"));
        match milter::run(listener, config, async move { stop.recv().await }).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("milter: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGTERM and SIGINT (Ctrl-C), listened to from the start of a serving
/// process: one that comes before anyone waits for it is kept, not lost.
struct Stop {
    terminate: Signal,
    interrupt: Signal,
}

impl Stop {
    fn listen() -> std::io::Result<Stop> {
        Ok(Stop {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Reads the policy, printing warnings, or every error as FILE:LINE:COL.
fn load_policy(files: &[PathBuf]) -> Option<Policy> {
    match Policy::from_paths(files) {
        Ok(policy) => {
            for w in policy.warning_lines() {
                print_err(&format!("{}\n", Escaped(w)));
            }
            Some(policy)
        }
        // One FILE:LINE:COL line per error, the first ones of many.
        Err(e @ PolicyError::Invalid { .. }) => {
            let lines: String = e
                .to_string()
                .lines()
                .map(|l| format!("{}\n", Escaped(l)))
                .collect();
            print_out(&lines);
            None
        }
        Err(e) => {
            print_out(&format!("{}\n", Escaped(e)));
            None
        }
    }
}

fn print_explanation(policy: &Policy, client: &Client) {
    use std::fmt::Write as _;
    let dash = |s: &Option<String>| {
        s.as_ref()
            .map_or("-".to_string(), |v| Escaped(v).to_string())
    };
    // An IPv6 client is counted by its network: say which.
    let client_text = client.ip.map_or("-".to_string(), |ip| {
        let counted = policy.counted_text(ip);
        if counted == ip.to_string() {
            counted
        } else {
            format!("{ip} (counted as {counted})")
        }
    });
    let mut out = format!(
        "client {} host {} sender {} auth {} class {}\n",
        client_text,
        dash(&client.host),
        dash(&client.sender),
        dash(&client.auth),
        Escaped(policy.class_of(client).unwrap_or("-")),
    );
    let _ = writeln!(
        out,
        "{:<13} {:<8} {:<9} {:<32} {:<24} note",
        "check", "enabled", "limit", "matched", "source"
    );
    for check in Check::ALL {
        let e = explain_check(policy, check, client);
        let _ = writeln!(
            out,
            "{:<13} {:<8} {:<9} {:<32} {:<24} {}",
            check.name(),
            if e.enabled { "yes" } else { "no" },
            e.limit.map_or("no limit".to_string(), |l| l.to_string()),
            Escaped(&e.matched).to_string(),
            e.source
                .as_ref()
                .map_or("-".to_string(), |s| Escaped(s).to_string()),
            e.note.as_deref().unwrap_or("-"),
        );
    }
    print_out(&out);
}
