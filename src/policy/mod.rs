//! The policy: an administrator's `ze-policy.txt` files read into tables,
//! and the answer to "which limit applies to this client for this check"
//! (`docs/policy.md` §3).

pub mod address;
mod encoding;
pub mod names;
mod parse;
pub mod report;
mod table;

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

pub use address::parse_client_addr;
pub(crate) use parse::parse_key;
pub use table::{Entry, Key, Origin, Table};

use crate::check::{Check, KeyKind, Switch};
use crate::window::WindowConfig;

/// A policy file's name and content. The content, not the path, is what a
/// policy is made of, so that it can be replicated and compared.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

impl PolicyFile {
    /// A file read from disk: its bytes as text, or where the first byte
    /// that is not UTF-8 outside a comment is.
    pub fn from_bytes(name: String, bytes: &[u8]) -> Result<PolicyFile, Diagnostic> {
        let text = encoding::decode(&name, bytes)?;
        Ok(PolicyFile { name, text })
    }
}

/// A message about one place in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: Arc<str>,
    pub line: u32,
    /// 1-based, in characters.
    pub column: u32,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Why a policy was refused. A refused policy is refused whole.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// One or more lines are wrong; each diagnostic names its place. The
    /// first [`MAX_DIAGNOSTICS`](crate::bounds::MAX_DIAGNOSTICS) errors are kept, in file and line order;
    /// `more` counts the others.
    #[error("{}", lines(&.errors.iter().map(|d| d.to_string()).collect::<Vec<_>>(), *.more, "errors").join("\n"))]
    Invalid {
        errors: Vec<Diagnostic>,
        more: usize,
    },
}

impl PolicyError {
    /// How many errors there were, those not kept included.
    pub fn error_count(&self) -> usize {
        match self {
            PolicyError::Read { .. } => 1,
            PolicyError::Invalid { errors, more } => errors.len() + more,
        }
    }
}

/// Diagnostics one a line, as many as fit in a gRPC status
/// ([`MAX_STATUS_BYTES`](crate::bounds::MAX_STATUS_BYTES); the first
/// always), then `... and N more WHAT` for those not kept or not shown.
fn lines(kept: &[String], more: usize, what: &str) -> Vec<String> {
    use crate::bounds::{status_len, MAX_STATUS_BYTES};
    let mut lines = Vec::new();
    let mut bytes = 0;
    for line in kept {
        bytes += status_len(line) + 3;
        if !lines.is_empty() && bytes > MAX_STATUS_BYTES {
            break;
        }
        lines.push(line.clone());
    }
    let more = more + kept.len() - lines.len();
    if more > 0 {
        lines.push(format!("... and {more} more {what}"));
    }
    lines
}

/// A parsed policy, immutable once built.
#[derive(Clone, Debug)]
pub struct Policy {
    switches: [bool; Switch::ALL.len()],
    tables: [Table<Option<u64>>; Check::ALL.len()],
    netclass: Table<Box<str>>,
    window: WindowConfig,
    dry_run: bool,
    files: Vec<PolicyFile>,
    /// The first [`MAX_DIAGNOSTICS`](crate::bounds::MAX_DIAGNOSTICS) warnings; `more_warnings` counts the
    /// others.
    warnings: Vec<Diagnostic>,
    more_warnings: usize,
    /// Cluster-wide limits are divided by this (a milter deciding alone
    /// for one of N relays); 1 otherwise.
    divisor: u64,
    /// `IPv6Prefix`: IPv6 clients are counted per network of this many
    /// bits (1 to 128).
    ipv6_prefix: u8,
    /// `UnusualFactor`, `UnusualFloor`, `UnusualKeys`.
    unusual: crate::baseline::UnusualConfig,
}

/// `IPv6Prefix` when the policy does not set it.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// What the MTA told us about the client: the input of every lookup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Client {
    /// `None` only for a client the MTA could not name (a Unix socket).
    pub ip: Option<IpAddr>,
    /// `{client_name}`, lower case, without a trailing dot; an
    /// internationalized name as its A-label (see [`names`]).
    pub host: Option<String>,
    /// Envelope sender as [`names::envelope_sender`] keeps it: without
    /// angle brackets, `<>` for the null sender. `None` before MAIL FROM.
    pub sender: Option<String>,
    /// `{auth_authen}`, lower case.
    pub auth: Option<String>,
}

impl Client {
    /// A client known by address only. IPv4-mapped IPv6 addresses are
    /// taken as IPv4, as an administrator writes them.
    pub fn from_ip(ip: IpAddr) -> Client {
        Client {
            ip: Some(canonical_ip(ip)),
            ..Client::default()
        }
    }

    pub fn with_host(mut self, host: &str) -> Client {
        let host = names::host(host);
        // Postfix sends "unknown" when the name could not be verified.
        self.host = (!host.is_empty() && host != "unknown").then_some(host);
        self
    }

    /// The envelope sender of MAIL FROM; an empty one (`<>`) is the null
    /// sender, a key like any other.
    pub fn with_sender(mut self, sender: &str) -> Client {
        self.sender = Some(names::envelope_sender(sender));
        self
    }

    pub fn with_auth(mut self, user: &str) -> Client {
        let u = user.trim().to_ascii_lowercase();
        self.auth = (!u.is_empty()).then_some(u);
        self
    }
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`) becomes IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Which entry gave a limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matched<'a> {
    Entry(&'a Origin),
    BuiltIn,
}

/// The limit of one check for one client, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub check: Check,
    pub enabled: bool,
    /// The limit in force: `None` is no limit (also when the check is off).
    pub limit: Option<u64>,
    pub matched: Matched<'a>,
}

impl Policy {
    /// Reads and parses files in order (earlier files win duplicates).
    /// A byte that is not UTF-8 is an error at its place, except in a
    /// comment line, which is read as Latin-1 (see `encoding`).
    pub fn from_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Policy, PolicyError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut errors = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let name = p.display().to_string();
            let bytes = std::fs::read(p).map_err(|source| PolicyError::Read {
                path: name.clone(),
                source,
            })?;
            match PolicyFile::from_bytes(name, &bytes) {
                Ok(file) => files.push(file),
                Err(d) => errors.push(d),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyError::Invalid { errors, more: 0 });
        }
        Policy::parse(files)
    }

    /// Parses file contents in order. Any error refuses the whole policy.
    pub fn parse(files: Vec<PolicyFile>) -> Result<Policy, PolicyError> {
        parse::parse(files)
    }

    /// Parses one text, named `name` in diagnostics.
    pub fn parse_str(name: &str, text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(vec![PolicyFile {
            name: name.to_string(),
            text: text.to_string(),
        }])
    }

    pub fn is_enabled(&self, check: Check) -> bool {
        self.switch(check.switch())
    }

    pub fn switch(&self, switch: Switch) -> bool {
        self.switches[switch as usize]
    }

    pub fn window(&self) -> WindowConfig {
        self.window
    }

    /// `IPv6Prefix`: the width, in bits, of the network an IPv6 client is
    /// counted by.
    pub fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }

    /// What a client address is counted by: an IPv4 address itself, an
    /// IPv6 address's first address of its `IPv6Prefix` network.
    pub fn counted_address(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) if self.ipv6_prefix < 128 => {
                let bits = u128::from(v6);
                let mask = u128::MAX << (128 - u32::from(self.ipv6_prefix));
                IpAddr::V6((bits & mask).into())
            }
            other => other,
        }
    }

    /// A counted address as replies, logs and reports show it: an IPv6
    /// network as `ADDRESS/N`, anything else as the address.
    pub fn counted_text(&self, ip: IpAddr) -> String {
        match self.counted_address(ip) {
            IpAddr::V6(v6) if self.ipv6_prefix < 128 => format!("{v6}/{}", self.ipv6_prefix),
            other => other.to_string(),
        }
    }

    /// `UnusualFactor`, `UnusualFloor`, `UnusualKeys`: when a key's rate is
    /// unusual for it.
    pub fn unusual(&self) -> crate::baseline::UnusualConfig {
        self.unusual
    }

    /// `DryRun YES`: count and log refusals, refuse nothing.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn files(&self) -> &[PolicyFile] {
        &self.files
    }

    /// Duplicates and entries of switched-off checks: the first
    /// [`MAX_DIAGNOSTICS`](crate::bounds::MAX_DIAGNOSTICS) of them.
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// The warnings as `FILE:LINE:COL: warning: message` lines, then
    /// `... and N more warnings` for those not kept or not shown.
    pub fn warning_lines(&self) -> Vec<String> {
        let kept: Vec<String> = self
            .warnings
            .iter()
            .map(|w| format!("{}:{}:{}: warning: {}", w.file, w.line, w.column, w.message))
            .collect();
        lines(&kept, self.more_warnings, "warnings")
    }

    pub fn entries(&self, check: Check) -> &Table<Option<u64>> {
        &self.tables[check.index()]
    }

    pub fn netclass_entries(&self) -> &Table<Box<str>> {
        &self.netclass
    }

    /// The limit in force for `check`, `None` for no limit. The hot path.
    pub fn limit(&self, check: Check, client: &Client) -> Option<u64> {
        if !self.is_enabled(check) {
            return None;
        }
        let limit = match self.lookup(check, client) {
            Some(entry) => entry.value,
            None => check.builtin_default(),
        }?;
        Some(self.share(check, limit))
    }

    /// The same policy with each cluster-wide limit (rates and open
    /// connections, not the per-connection counts) divided by `relays`,
    /// at least 1: what one relay may allow when it must decide alone.
    pub fn divided(&self, relays: u64) -> Policy {
        Policy {
            divisor: relays.max(1),
            // A milter deciding alone for a while has no history to
            // compare with: it flags nothing.
            unusual: crate::baseline::UnusualConfig {
                factor: 0,
                ..self.unusual
            },
            ..self.clone()
        }
    }

    fn share(&self, check: Check, limit: u64) -> u64 {
        match check.measure() {
            crate::check::Measure::PerConnection => limit,
            _ => (limit / self.divisor).max(1),
        }
    }

    /// The limit and the entry it came from, for `policy explain`.
    pub fn resolve(&self, check: Check, client: &Client) -> Resolved<'_> {
        let enabled = self.is_enabled(check);
        let (limit, matched) = match self.lookup(check, client) {
            Some(entry) => (entry.value, Matched::Entry(&entry.origin)),
            None => (check.builtin_default(), Matched::BuiltIn),
        };
        Resolved {
            check,
            enabled,
            limit: if enabled {
                limit.map(|l| self.share(check, l))
            } else {
                None
            },
            matched,
        }
    }

    /// The client's class label: a `NetClass` entry, else `local` for the
    /// loopback address; `auth` once the client has authenticated.
    pub fn class_of<'a>(&'a self, client: &Client) -> Option<&'a str> {
        if client.auth.is_some() {
            return Some("auth");
        }
        let by_net = client.ip.and_then(|ip| self.netclass.by_address(ip));
        let by_host = || {
            client
                .host
                .as_deref()
                .and_then(|h| self.netclass.by_domain(h))
        };
        match by_net.or_else(by_host) {
            Some(entry) => Some(&entry.value),
            None => match client.ip {
                Some(ip) if ip.is_loopback() && is_loopback_one(ip) => Some("local"),
                _ => None,
            },
        }
    }

    /// The first match of `docs/policy.md` §3, "Which entry applies".
    fn lookup(&self, check: Check, client: &Client) -> Option<&Entry<Option<u64>>> {
        let table = &self.tables[check.index()];
        let found = match check.key_kind() {
            KeyKind::Client => client
                .ip
                .and_then(|ip| table.by_address(ip))
                .or_else(|| client.host.as_deref().and_then(|h| table.by_domain(h)))
                .or_else(|| self.class_of(client).and_then(|label| table.by_name(label))),
            KeyKind::Sender => client.sender.as_deref().and_then(|s| table.by_sender(s)),
            KeyKind::AuthUser => client.auth.as_deref().and_then(|u| table.by_name(u)),
        };
        found.or_else(|| table.default_entry())
    }
}

/// 127.0.0.1 and ::1, the addresses made `LOCAL` (`docs/policy.md` §3).
fn is_loopback_one(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets() == [127, 0, 0, 1],
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}
