//! Who may call a node's peer listener (the `Raft` service): the other
//! members of its cluster, and nobody else.
//!
//! A call proves where it comes from in one or both of two ways:
//! - **the cluster secret**, a file given to every node: each call carries
//!   [`PEER_HEADER`] `ID.MS.MAC`, the caller's node id, its clock in
//!   milliseconds and an HMAC-SHA256 under the secret over the method, the
//!   id, the clock and the message. The secret never crosses the network,
//!   a message cannot be changed or claimed for another id, and a MAC more
//!   than [`MAX_SKEW_MS`] away from this node's clock is refused.
//! - **TLS**: the caller's certificate, which the cluster's CA signed
//!   (checked in the handshake), must name the host of the member it
//!   claims to be, as a DNS or IP subject alternative name. A milter's or
//!   an operator's certificate names other hosts.
//!
//! Both are checked when both are configured. Which ids are members, and
//! what each may ask, is decided by the service ([`crate::node`]).

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::Status;

use super::NodeId;
use crate::proto::v1::RaftPayload;

/// The metadata key of a peer call's proof.
pub const PEER_HEADER: &str = "x-relayrate-peer";
/// How far a caller's clock may be from ours (5 minutes, as Kerberos).
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// A secret shorter than this (128 bits) is refused.
pub const MIN_SECRET_BYTES: usize = 16;
/// Bytes of a generated secret (256 bits), written as hex.
const GENERATED_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: cannot read the cluster secret: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: cannot write a new cluster secret: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: the cluster secret is {len} bytes; at least {MIN_SECRET_BYTES} are needed \
         (generate one with: head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')"
    )]
    TooShort { path: String, len: usize },
}

/// The secret every node of a cluster shares. Its bytes are the file's
/// content with surrounding white space removed.
#[derive(Clone)]
pub struct ClusterSecret(Arc<[u8]>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A secret from bytes (tests, and files read elsewhere).
    ///
    /// Errors: fewer than [`MIN_SECRET_BYTES`] bytes.
    pub fn new(bytes: &[u8], origin: &str) -> Result<ClusterSecret, SecretError> {
        let bytes = bytes.trim_ascii();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                path: origin.to_string(),
                len: bytes.len(),
            });
        }
        Ok(ClusterSecret(bytes.into()))
    }

    /// Reads a secret file.
    pub fn read(path: &Path) -> Result<ClusterSecret, SecretError> {
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ClusterSecret::new(&bytes, &path.display().to_string())
    }

    /// Reads a secret file, or, if there is none, writes a new random one
    /// (readable by its owner only) and returns it.
    pub fn read_or_create(path: &Path) -> Result<ClusterSecret, SecretError> {
        if path.exists() {
            return ClusterSecret::read(path);
        }
        let write_err = |source| SecretError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut raw = [0u8; GENERATED_BYTES];
        getrandom::fill(&mut raw).map_err(|e| write_err(std::io::Error::other(e)))?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write_err)?;
        }
        write_private(path, format!("{hex}\n").as_bytes()).map_err(write_err)?;
        ClusterSecret::new(hex.as_bytes(), &path.display().to_string())
    }

    fn mac(&self, method: &str, id: NodeId, ms: u64, data: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"relayrate-peer-v1\0");
        mac.update(method.as_bytes());
        mac.update(b"\0");
        mac.update(&id.to_be_bytes());
        mac.update(&ms.to_be_bytes());
        mac.update(data);
        mac
    }
}

/// Creates `path` for its owner only; fails if it exists.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// How this node proves itself to its peers and checks their proofs.
#[derive(Clone, Debug)]
pub struct PeerAuth {
    /// This node's id, claimed in every call it makes.
    pub id: NodeId,
    secret: Option<ClusterSecret>,
    /// Whether the peer listener asks for certificates (TLS is on).
    tls: bool,
}

/// A caller whose proof held: the id it claims, and, with TLS, the names
/// its certificate carries.
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: NodeId,
    /// DNS names (lower case) and IP addresses of the certificate; `None`
    /// without TLS.
    names: Option<Vec<CertName>>,
    /// The call's MAC and clock, with the cluster secret: what a replay
    /// of the same call would carry again.
    signed: Option<([u8; 32], u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CertName {
    Dns(String),
    Ip(IpAddr),
}

impl Caller {
    /// Whether the caller may speak for a node at `addr` (`host:port`,
    /// `[v6]:port`, or a URL): its certificate names `host`. Always true
    /// without TLS, where the secret alone speaks for the node.
    pub fn speaks_for(&self, addr: &str) -> bool {
        let Some(names) = &self.names else {
            return true;
        };
        let host = host_of(addr);
        let wanted = match host.parse::<IpAddr>() {
            Ok(ip) => CertName::Ip(ip),
            Err(_) => CertName::Dns(host.trim_end_matches('.').to_ascii_lowercase()),
        };
        names.contains(&wanted)
    }
}

/// The host part of `host:port`, `[v6]:port` or `scheme://host:port`.
pub fn host_of(addr: &str) -> &str {
    let bare = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let bare = bare.split('/').next().unwrap_or(bare);
    if let Some(rest) = bare.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match bare.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => bare,
    }
}

impl PeerAuth {
    pub fn new(id: NodeId, secret: Option<ClusterSecret>, tls: bool) -> PeerAuth {
        PeerAuth { id, secret, tls }
    }

    /// Whether any peer can be accepted at all: without a secret and
    /// without TLS, none can.
    pub fn accepts_peers(&self) -> bool {
        self.secret.is_some() || self.tls
    }

    /// Adds this node's proof to a call of `method` carrying `payload`.
    pub fn sign(&self, method: &str, request: &mut tonic::Request<RaftPayload>, now_ms: u64) {
        let value = match &self.secret {
            Some(secret) => {
                let tag = secret
                    .mac(method, self.id, now_ms, &request.get_ref().data)
                    .finalize()
                    .into_bytes();
                let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
                format!("{}.{now_ms}.{hex}", self.id)
            }
            None => self.id.to_string(),
        };
        let value = value.parse().expect("ASCII digits, dots and hex");
        request.metadata_mut().insert(PEER_HEADER, value);
    }

    /// What can be checked of a call before its message is read: that it
    /// carries a proof of the right shape, fresh. Run on the headers (an
    /// interceptor), so that a caller without one never has its message
    /// buffered, let alone decoded.
    ///
    /// Errors: `UNAUTHENTICATED`, as [`PeerAuth::verify`].
    pub fn precheck(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        now_ms: u64,
    ) -> Result<(), Status> {
        if !self.accepts_peers() {
            return Err(Status::unauthenticated(
                "this node has neither a cluster secret nor TLS: it accepts no peers",
            ));
        }
        let header = metadata
            .get(PEER_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("peer calls need the cluster's proof"))?;
        let mut parts = header.splitn(3, '.');
        let id_ok = parts.next().is_some_and(|id| id.parse::<NodeId>().is_ok());
        let shaped = match &self.secret {
            None => id_ok,
            Some(_) => {
                let ms = parts.next().and_then(|ms| ms.parse::<u64>().ok());
                let tag = parts.next().unwrap_or("");
                id_ok
                    && ms.is_some_and(|ms| ms.abs_diff(now_ms) <= MAX_SKEW_MS)
                    && tag.len() == 64
                    && tag.bytes().all(|b| b.is_ascii_hexdigit())
            }
        };
        match shaped {
            true => Ok(()),
            false => Err(Status::unauthenticated("malformed or stale peer proof")),
        }
    }

    /// Checks a call of `method`: the MAC under the secret, and the
    /// certificate's names with TLS.
    ///
    /// Errors: `UNAUTHENTICATED` when the proof is missing, malformed,
    /// stale or wrong, or when this node accepts no peers.
    pub fn verify(
        &self,
        method: &str,
        request: &tonic::Request<RaftPayload>,
        now_ms: u64,
    ) -> Result<Caller, Status> {
        if !self.accepts_peers() {
            return Err(Status::unauthenticated(
                "this node has neither a cluster secret nor TLS: it accepts no peers",
            ));
        }
        let header = request
            .metadata()
            .get(PEER_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("peer calls need the cluster's proof"))?;
        let mut signed = None;
        let mut parts = header.splitn(3, '.');
        let id: NodeId = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Status::unauthenticated("malformed peer proof"))?;
        if let Some(secret) = &self.secret {
            let (Some(ms), Some(tag)) = (parts.next(), parts.next()) else {
                return Err(Status::unauthenticated("the peer proof has no MAC"));
            };
            let ms: u64 = ms
                .parse()
                .map_err(|_| Status::unauthenticated("malformed peer proof"))?;
            if ms.abs_diff(now_ms) > MAX_SKEW_MS {
                return Err(Status::unauthenticated(
                    "the peer proof's clock is more than 5 minutes from this node's",
                ));
            }
            let tag = from_hex(tag).ok_or_else(|| Status::unauthenticated("malformed MAC"))?;
            secret
                .mac(method, id, ms, &request.get_ref().data)
                .verify_slice(&tag)
                .map_err(|_| Status::unauthenticated("wrong MAC: not this cluster's secret"))?;
            signed = tag.try_into().ok().map(|tag| (tag, ms));
        }
        let names = match self.tls {
            true => Some(certificate_names(request)?),
            false => None,
        };
        Ok(Caller { id, names, signed })
    }
}

/// The signed calls seen within the clock window, so that a call that
/// must not be done twice (an admin write, a membership notice) is done
/// once: a captured one replayed within [`MAX_SKEW_MS`] is refused. Raft's
/// own calls and counted events need no guard: terms and request ids make
/// their replays harmless.
#[derive(Default)]
pub struct ReplayGuard {
    seen: std::sync::Mutex<std::collections::HashMap<[u8; 32], u64>>,
}

/// Calls remembered at most: a flood of valid calls (only members can
/// make them) fills it; then guarded calls are refused until some expire.
const REPLAY_MEMORY: usize = 100_000;

impl ReplayGuard {
    /// Whether `caller`'s call is seen for the first time. A call without
    /// a MAC (TLS alone, whose sessions cannot be replayed) always is.
    pub fn first_time(&self, caller: &Caller, now_ms: u64) -> bool {
        let Some((tag, ms)) = caller.signed else {
            return true;
        };
        let mut seen = self.seen.lock().expect("replay guard lock");
        if seen.len() >= REPLAY_MEMORY {
            seen.retain(|_, at| at.abs_diff(now_ms) <= MAX_SKEW_MS);
            if seen.len() >= REPLAY_MEMORY {
                return false;
            }
        }
        seen.insert(tag, ms).is_none()
    }
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The subject alternative names of the caller's certificate.
fn certificate_names<T>(request: &tonic::Request<T>) -> Result<Vec<CertName>, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("peer calls need a client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("peer calls need a client certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| Status::unauthenticated("unreadable client certificate"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    names.push(CertName::Dns(d.trim_end_matches('.').to_ascii_lowercase()))
                }
                x509_parser::extensions::GeneralName::IPAddress(raw) => {
                    let ip = match raw.len() {
                        4 => <[u8; 4]>::try_from(*raw).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*raw).ok().map(IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(CertName::Ip));
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes(), "test").unwrap()
    }

    fn signed(auth: &PeerAuth, method: &str, data: &[u8], ms: u64) -> tonic::Request<RaftPayload> {
        let mut r = tonic::Request::new(RaftPayload {
            data: data.to_vec(),
        });
        auth.sign(method, &mut r, ms);
        r
    }

    #[test]
    fn a_signed_call_verifies_and_names_its_sender() {
        let a = PeerAuth::new(3, Some(secret("0123456789abcdef0123")), false);
        let b = PeerAuth::new(1, Some(secret("0123456789abcdef0123")), false);
        let r = signed(&a, "vote", b"payload", 1_000_000);
        assert_eq!(b.verify("vote", &r, 1_000_500).unwrap().id, 3);
    }

    #[test]
    fn a_wrong_secret_another_method_a_changed_payload_or_a_stale_clock_is_refused() {
        let a = PeerAuth::new(3, Some(secret("0123456789abcdef0123")), false);
        let b = PeerAuth::new(1, Some(secret("another secret of the cluster")), false);
        let same = PeerAuth::new(1, Some(secret("0123456789abcdef0123")), false);
        let r = signed(&a, "vote", b"payload", 1_000_000);
        assert!(b.verify("vote", &r, 1_000_000).is_err());
        assert!(same.verify("append_entries", &r, 1_000_000).is_err());
        assert!(same
            .verify("vote", &r, 1_000_000 + MAX_SKEW_MS + 1)
            .is_err());
        let mut changed = r;
        changed.get_mut().data = b"pAyload".to_vec();
        assert!(same.verify("vote", &changed, 1_000_000).is_err());
    }

    #[test]
    fn a_claimed_id_cannot_be_changed_under_the_mac() {
        let a = PeerAuth::new(3, Some(secret("0123456789abcdef0123")), false);
        let b = PeerAuth::new(1, Some(secret("0123456789abcdef0123")), false);
        let mut r = signed(&a, "vote", b"x", 5);
        let forged = r
            .metadata()
            .get(PEER_HEADER)
            .unwrap()
            .to_str()
            .unwrap()
            .replacen('3', "66", 1);
        r.metadata_mut()
            .insert(PEER_HEADER, forged.parse().unwrap());
        assert!(b.verify("vote", &r, 5).is_err());
    }

    #[test]
    fn no_proof_or_no_way_to_check_one_is_refused() {
        let b = PeerAuth::new(1, Some(secret("0123456789abcdef0123")), false);
        let bare = tonic::Request::new(RaftPayload { data: vec![] });
        assert!(b.verify("vote", &bare, 0).is_err());
        let open = PeerAuth::new(1, None, false);
        let r = signed(&PeerAuth::new(2, None, false), "vote", b"", 0);
        assert!(!open.accepts_peers());
        assert!(open.verify("vote", &r, 0).is_err());
    }

    #[test]
    fn the_precheck_refuses_what_has_no_fresh_proof_and_passes_a_signed_call() {
        let a = PeerAuth::new(3, Some(secret("0123456789abcdef0123")), false);
        let b = PeerAuth::new(1, Some(secret("0123456789abcdef0123")), false);
        let r = signed(&a, "vote", b"x", 1_000_000);
        assert!(b.precheck(r.metadata(), 1_000_000).is_ok());
        assert!(b
            .precheck(r.metadata(), 1_000_000 + MAX_SKEW_MS + 1)
            .is_err());
        let bare = tonic::Request::new(RaftPayload { data: vec![] });
        assert!(b.precheck(bare.metadata(), 0).is_err());
        let mut short = tonic::Request::new(RaftPayload { data: vec![] });
        short
            .metadata_mut()
            .insert(PEER_HEADER, "1.1000000.abc".parse().unwrap());
        assert!(b.precheck(short.metadata(), 1_000_000).is_err());
    }

    #[test]
    fn a_guarded_call_is_taken_once() {
        let a = PeerAuth::new(3, Some(secret("0123456789abcdef0123")), false);
        let b = PeerAuth::new(1, Some(secret("0123456789abcdef0123")), false);
        let guard = ReplayGuard::default();
        let r = signed(&a, "propose", b"reset", 1_000);
        let caller = b.verify("propose", &r, 1_000).unwrap();
        assert!(guard.first_time(&caller, 1_000));
        let again = b.verify("propose", &r, 61_000).unwrap();
        assert!(!guard.first_time(&again, 61_000), "a replay was taken");
        let other = signed(&a, "propose", b"reset", 1_001);
        assert!(guard.first_time(&b.verify("propose", &other, 1_001).unwrap(), 1_001));
    }

    #[test]
    fn short_secrets_are_refused_and_generated_ones_are_private() {
        assert!(ClusterSecret::new(b"  short \n", "x").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cluster-secret");
        let made = ClusterSecret::read_or_create(&path).unwrap();
        let again = ClusterSecret::read_or_create(&path).unwrap();
        assert_eq!(made.0, again.0);
        assert_eq!(made.0.len(), 2 * GENERATED_BYTES);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("relayrate-0.peers:7460"), "relayrate-0.peers");
        assert_eq!(host_of("http://127.0.0.1:7460"), "127.0.0.1");
        assert_eq!(host_of("[2001:db8::1]:7460"), "2001:db8::1");
        assert_eq!(host_of("2001:db8::1"), "2001:db8::1");
        assert_eq!(host_of("node"), "node");
    }
}
