//! The relayrate server and its administrator commands.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relayrate::check::Check;
use relayrate::policy::report::{explain, explain_check, summary};
use relayrate::policy::{Client, Policy, PolicyError};

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
                println!("{out}");
            } else {
                print_explanation(&policy, &client);
            }
            ExitCode::SUCCESS
        }
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
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_string());
    println!(
        "client {} host {} sender {} auth {} class {}",
        client.ip.map_or("-".to_string(), |ip| ip.to_string()),
        dash(&client.host),
        dash(&client.sender),
        dash(&client.auth),
        policy.class_of(client).unwrap_or("-"),
    );
    println!(
        "{:<13} {:<8} {:<9} {:<32} source",
        "check", "enabled", "limit", "matched"
    );
    for check in Check::ALL {
        let e = explain_check(policy, check, client);
        println!(
            "{:<13} {:<8} {:<9} {:<32} {}",
            check.name(),
            if e.enabled { "yes" } else { "no" },
            e.limit.map_or("no limit".to_string(), |l| l.to_string()),
            e.matched,
            e.source.as_deref().unwrap_or("-"),
        );
    }
}
