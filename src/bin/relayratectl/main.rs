//! relayratectl: the administrator's client of a relayrate cluster. Each
//! command is one call to the `relayrate.v1.Admin` service of one node
//! (any member answers; writes are forwarded to the leader there).
//!
//! Layout: `client` reaches the node and turns failures into exit codes;
//! `render` turns answers into JSON or tables. This file reads the command
//! line and runs the command.
//!
//! Exit codes: 0 done, 1 refused or invalid, 64 bad usage, 69 the node
//! cannot be reached or cannot serve.

mod client;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use relayrate::check::Check;
use relayrate::policy::{Policy, PolicyError};
use relayrate::proto::v1 as pb;
use relayrate::terminal::{escape_json, print_err, print_out, Escaped};
use serde::Serialize;

use client::{Admin, Conn, Failure, Guard, Target, TlsFiles, EX_REFUSED, EX_USAGE};
use render::{AppliedView, MembersView, PolicyView, ResetView, ShowView, StatusView, TopView};

const DEFAULT_NODE: &str = "http://127.0.0.1:7450";

#[derive(Parser)]
#[command(
    name = "relayratectl",
    version,
    about = "Administer a relayrate cluster through any of its nodes"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every command takes, before or after its name.
#[derive(Args)]
struct GlobalArgs {
    /// The node to ask, a URL or HOST:PORT [env: RELAYRATE_NODE]
    /// [default: http://127.0.0.1:7450]
    #[arg(long, global = true, value_name = "URL")]
    node: Option<String>,
    /// Print one JSON object instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// File holding the admin token, sent as `authorization: Bearer TOKEN`
    /// [env: RELAYRATE_ADMIN_TOKEN_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) the node's certificate is checked against;
    /// turns on TLS.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for nodes that ask for one.
    #[arg(long, global = true, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, global = true, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Give up on the node after this many seconds.
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value = "10",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    timeout_secs: u64,
}

#[derive(Subcommand)]
enum Command {
    /// This node's view: role, leader, log, policy, members.
    Status,
    /// The cluster's members and their replication health.
    Members,
    /// Add a node (as a learner, then a voter once it has caught up).
    AddNode {
        id: u64,
        /// Where the other nodes reach it (HOST:PORT).
        addr: String,
    },
    /// Remove a node from the cluster.
    RemoveNode { id: u64 },
    /// The keys nearest their limits.
    Top {
        /// Only this check (ConnRate, MsgRate, ...).
        #[arg(long, value_name = "CHECK", value_parser = parse_check)]
        check: Option<Check>,
        /// How many keys.
        #[arg(short = 'n', long = "keys", default_value = "10")]
        n: u32,
        /// Only keys unusual now: counting well above their own baseline
        /// (UnusualFactor, UnusualFloor), with their bucket count and
        /// baseline.
        #[arg(long)]
        unusual: bool,
    },
    /// Every count of one key (a client address, sender or AUTH user).
    Show { key: String },
    /// Clear the counts of a key.
    Reset {
        key: String,
        /// Only this check's count.
        #[arg(long, value_name = "CHECK", value_parser = parse_check)]
        check: Option<Check>,
    },
    /// The policy in force, or put a new one in force.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print a policy with limits chosen from what the cluster has seen:
    /// each key's highest window count in each hour of the last 7 days.
    /// Check it with `relayrate policy check` and `relayrate replay`
    /// before applying it.
    Suggest {
        /// The share of each key's hours that may see a refusal (0 to 1).
        #[arg(long, default_value_t = 0.01, value_parser = relayrate::history::suggest::parse_share)]
        delay_share: f64,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// The files of the policy in force and their hash.
    Show,
    /// Check policy files here, then put them in force on every node.
    Apply {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Check names as written in policy files, any case.
fn parse_check(s: &str) -> Result<Check, String> {
    s.parse::<Check>().map_err(|e| {
        let names: Vec<&str> = Check::ALL.iter().map(|c| c.name()).collect();
        format!("{e}; one of {}", names.join(", "))
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; the rest is EX_USAGE.
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            print_err(&format!("relayratectl: cannot start: {e}\n"));
            return ExitCode::from(EX_REFUSED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // The message may quote the node's, which may quote a request.
            print_err(&format!("relayratectl: {}\n", Escaped(&f.message)));
            ExitCode::from(f.code)
        }
    }
}

/// Flags first, then the environment, then the default.
fn target(g: &GlobalArgs) -> Target {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    Target {
        url: g
            .node
            .clone()
            .or_else(|| env("RELAYRATE_NODE").map(|v| v.to_string_lossy().into_owned()))
            .unwrap_or_else(|| DEFAULT_NODE.to_string()),
        tls: TlsFiles {
            ca: g.tls_ca.clone(),
            cert: g.tls_cert.clone(),
            key: g.tls_key.clone(),
        },
        token_file: g
            .token_file
            .clone()
            .or_else(|| env("RELAYRATE_ADMIN_TOKEN_FILE").map(PathBuf::from)),
        timeout: Duration::from_secs(g.timeout_secs),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.global.json;
    // A bad policy is refused before any node is asked.
    let policy = match &cli.command {
        Command::Policy(PolicyCommand::Apply { files }) => Some(check_locally(files)?),
        _ => None,
    };
    let Conn { mut admin, guard } = client::connect(&target(&cli.global)).await?;
    match cli.command {
        Command::Status => {
            let r = guard.call(admin.status(pb::StatusRequest {})).await?;
            emit(json, &StatusView::from(&r), StatusView::text);
        }
        Command::Members => {
            let r = guard.call(admin.members(pb::MembersRequest {})).await?;
            emit(json, &MembersView::from(&r), MembersView::text);
        }
        Command::AddNode { id, addr } => {
            let req = pb::AddNodeRequest { id, addr };
            let r = guard.call(admin.add_node(req)).await?;
            emit(json, &MembersView::from(&r), MembersView::text);
        }
        Command::RemoveNode { id } => {
            let req = pb::RemoveNodeRequest { id };
            let r = guard.call(admin.remove_node(req)).await?;
            emit(json, &MembersView::from(&r), MembersView::text);
        }
        Command::Top { check, n, unusual } => {
            let req = pb::TopRequest {
                check: check_pb(check),
                limit: n,
                unusual,
            };
            let r = guard.call(admin.top(req)).await?;
            let view = TopView::from(&r).unusual_only(unusual);
            emit(json, &view, TopView::text);
        }
        Command::Show { key } => {
            let req = pb::ShowRequest { key: key.clone() };
            let r = guard.call(admin.show(req)).await?;
            emit(json, &ShowView::new(&key, &r), ShowView::text);
        }
        Command::Reset { key, check } => {
            let req = pb::ResetRequest {
                key: key.clone(),
                check: check_pb(check),
                requested_by: requested_by(),
            };
            let r = guard.call(admin.reset(req)).await?;
            let view = ResetView {
                key,
                check: check.map(|c| c.name().to_string()),
                cleared: r.cleared,
            };
            emit(json, &view, ResetView::text);
        }
        Command::Suggest { delay_share } => {
            let req = pb::SuggestRequest {
                delay_share: Some(delay_share),
            };
            let r = guard.call(admin.suggest(req)).await?;
            if json {
                let view = serde_json::json!({ "policy": r.policy });
                println!("{view}");
            } else {
                print!("{}", r.policy);
            }
        }
        Command::Policy(PolicyCommand::Show) => {
            let r = guard
                .call(admin.show_policy(pb::ShowPolicyRequest {}))
                .await?;
            emit(json, &PolicyView::from(&r), PolicyView::text);
        }
        Command::Policy(PolicyCommand::Apply { .. }) => {
            let policy = policy.expect("checked above");
            apply_policy(&mut admin, &guard, json, &policy).await?;
        }
    }
    Ok(())
}

fn check_pb(check: Option<Check>) -> i32 {
    check.map_or(pb::Check::Unspecified, pb::Check::from) as i32
}

/// Prints the answer: one JSON object, or the view's text (which escapes
/// its values).
fn emit<V: Serialize>(json: bool, view: &V, text: impl Fn(&V) -> String) {
    let out = if json {
        let mut s = escape_json(&serde_json::to_string(view).expect("views are plain data"));
        s.push('\n');
        s
    } else {
        text(view)
    };
    print_out(&out);
}

/// Who asked for a reset, for the node's log: `$USER@hostname`.
fn requested_by() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".to_string());
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string());
    format!("{user}@{host}")
}

/// Parses the files as a node would; every error is printed as
/// FILE:LINE:COL: message and nothing is sent.
fn check_locally(files: &[PathBuf]) -> Result<Policy, Failure> {
    match Policy::from_paths(files) {
        Ok(p) => Ok(p),
        Err(e @ PolicyError::Invalid { .. }) => {
            // The first errors one a line, then how many more.
            for line in e.to_string().lines() {
                print_err(&format!("{}\n", Escaped(line)));
            }
            let n = e.error_count();
            Err(Failure::refused(format!(
                "policy not applied: {n} error{} (nothing was sent)",
                if n == 1 { "" } else { "s" }
            )))
        }
        Err(e @ PolicyError::Read { .. }) => Err(Failure {
            code: EX_USAGE,
            message: e.to_string(),
        }),
    }
}

async fn apply_policy(
    admin: &mut Admin,
    guard: &Guard,
    json: bool,
    policy: &Policy,
) -> Result<(), Failure> {
    let files = policy.files().iter().map(pb::PolicyFile::from).collect();
    let req = pb::ApplyPolicyRequest { files };
    let r = match guard.call_status(admin.apply_policy(req)).await? {
        Ok(r) => r,
        // The node's own validation refused it (a node of another
        // version?): its message holds one FILE:LINE:COL line per error.
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            for line in status.message().lines() {
                print_err(&format!("{}\n", Escaped(line)));
            }
            return Err(Failure::refused(format!(
                "policy not applied: {} refused it",
                guard.url
            )));
        }
        Err(status) => return Err(Failure::from_status(&guard.url, &status)),
    };
    let view = AppliedView {
        hash: r.hash,
        changed: r.changed,
        warnings: r.warnings,
    };
    if !json {
        for w in &view.warnings {
            print_err(&format!("{}\n", Escaped(w)));
        }
    }
    emit(json, &view, AppliedView::text);
    Ok(())
}
