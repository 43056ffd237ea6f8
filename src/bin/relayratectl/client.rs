//! Reaching a node's Admin service: the channel (plain or TLS), the
//! bearer token on every call, a deadline on every step, and the one place
//! where a failure becomes a message and an exit code.

use std::error::Error as StdError;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relayrate::proto::v1::admin_client::AdminClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

/// sysexits.h: the command line or its files cannot be used.
pub const EX_USAGE: u8 = 64;
/// sysexits.h: the node cannot be reached or cannot serve now.
pub const EX_UNAVAILABLE: u8 = 69;
/// Refused by the node, or invalid input.
pub const EX_REFUSED: u8 = 1;

/// Why a command failed: one line for a person, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EX_USAGE,
            message: message.into(),
        }
    }

    pub fn refused(message: impl Into<String>) -> Failure {
        Failure {
            code: EX_REFUSED,
            message: message.into(),
        }
    }

    fn unavailable(message: impl Into<String>) -> Failure {
        Failure {
            code: EX_UNAVAILABLE,
            message: message.into(),
        }
    }

    /// A gRPC status from `url`, in words an operator can act on.
    pub fn from_status(url: &str, status: &Status) -> Failure {
        let msg = status.message();
        // The connection broke under the call (a TLS alert, a node going
        // away, TLS spoken to plain HTTP): tonic keeps the cause as the
        // status's source. A status the node sent has none.
        if let Some(cause) = status.source() {
            let hint = if url.starts_with("http://") {
                " (if the node uses TLS, give --tls-ca)"
            } else {
                ""
            };
            return Failure::unavailable(format!(
                "connection to {url} lost: {}{hint}",
                error_chain(cause)
            ));
        }
        match status.code() {
            Code::Unauthenticated => Failure::refused(format!(
                "permission denied: unauthenticated: {msg} (give --token-file)"
            )),
            Code::PermissionDenied => Failure::refused(format!("permission denied: {msg}")),
            Code::Unavailable => Failure::unavailable(format!("{url} unavailable: {msg}")),
            Code::DeadlineExceeded => Failure::unavailable(format!("no answer from {url}: {msg}")),
            Code::Unimplemented => Failure::refused(format!(
                "{url} does not serve this request (an older node?): {msg}"
            )),
            Code::InvalidArgument => Failure::refused(format!("invalid: {msg}")),
            Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::Aborted
            | Code::OutOfRange => Failure::refused(format!("refused: {msg}")),
            code => Failure::refused(format!("{url}: {code:?}: {msg}")),
        }
    }
}

/// Every cause of an error on one line: tonic's own Display says only
/// "transport error", the useful part ("Connection refused") is deeper.
pub fn error_chain(e: &dyn StdError) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Layers often repeat their inner error's text; say it once.
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// TLS material named on the command line.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Where and how to reach a node.
pub struct Target {
    pub url: String,
    pub tls: TlsFiles,
    pub token_file: Option<PathBuf>,
    pub timeout: Duration,
}

/// Adds the bearer token (when there is one) and the deadline to every
/// request, so that no call can forget either.
#[derive(Clone)]
pub struct Auth {
    bearer: Option<MetadataValue<Ascii>>,
    timeout: Duration,
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(b) = &self.bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        req.set_timeout(self.timeout);
        Ok(req)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Auth>>;

/// A connected client, and the deadline its calls keep.
pub struct Conn {
    pub admin: Admin,
    pub guard: Guard,
}

/// The node's URL and the deadline, kept apart from the client so that a
/// call can borrow both.
pub struct Guard {
    pub url: String,
    timeout: Duration,
}

impl Guard {
    /// Runs one call under the deadline; a node that accepts the connection
    /// and then says nothing must not make relayratectl hang.
    pub async fn call<T>(
        &self,
        fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Failure> {
        match self.call_status(fut).await? {
            Ok(r) => Ok(r),
            // tonic enforces the grpc-timeout the interceptor set.
            Err(status)
                if status.code() == Code::DeadlineExceeded
                    || (status.code() == Code::Cancelled
                        && status.message() == "Timeout expired") =>
            {
                Err(self.no_answer(status.message()))
            }
            Err(status) => Err(Failure::from_status(&self.url, &status)),
        }
    }

    /// As `call`, but the node's refusal comes back as it is, for a caller
    /// that reads its details.
    pub async fn call_status<T>(
        &self,
        fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<Result<T, Status>, Failure> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => Ok(r.map(tonic::Response::into_inner)),
            Err(_) => Err(self.no_answer("timed out")),
        }
    }

    fn no_answer(&self, why: &str) -> Failure {
        Failure::unavailable(format!(
            "no answer from {} within {}s: {why}",
            self.url,
            self.timeout.as_secs_f64()
        ))
    }
}

/// Reads the token file: its content, trimmed, is the token.
pub fn read_token(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("{}: cannot read: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Failure::usage(format!("{}: empty token", path.display())));
    }
    Ok(token.to_string())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|e| Failure::usage(format!("{what} {}: cannot read: {e}", path.display())))
}

/// The URL to dial. A bare HOST:PORT (as nodes are named in their own
/// flags) gets a scheme; TLS material turns `http://` into `https://`,
/// since tonic speaks TLS only to https URLs.
pub fn dial_url(url: &str, tls: bool) -> String {
    let rest = match url.split_once("://") {
        None => url,
        Some(("http", rest)) => rest,
        Some(_) => return url.to_string(),
    };
    if tls {
        format!("https://{rest}")
    } else {
        format!("http://{rest}")
    }
}

fn tls_config(files: &TlsFiles) -> Result<ClientTlsConfig, Failure> {
    let mut config = ClientTlsConfig::new();
    match &files.ca {
        Some(ca) => {
            config = config.ca_certificate(Certificate::from_pem(read_file(ca, "--tls-ca")?));
        }
        // Whatever roots this build of tonic trusts; an https node with a
        // private CA needs --tls-ca.
        None => config = config.with_enabled_roots(),
    }
    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
        config = config.identity(Identity::from_pem(
            read_file(cert, "--tls-cert")?,
            read_file(key, "--tls-key")?,
        ));
    }
    Ok(config)
}

/// Opens the connection now (not lazily at the first call), so that an
/// unreachable node is reported as such, quickly.
pub async fn connect(target: &Target) -> Result<Conn, Failure> {
    let bearer = match &target.token_file {
        Some(path) => {
            let token = read_token(path)?;
            let value = format!("Bearer {token}").parse().map_err(|_| {
                Failure::usage(format!(
                    "{}: the token has characters a header cannot carry",
                    path.display()
                ))
            })?;
            Some(value)
        }
        None => None,
    };
    let use_tls = target.tls.ca.is_some() || target.url.starts_with("https://");
    let url = dial_url(&target.url, use_tls);
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(Failure::usage(format!(
            "bad --node {}: http:// or https:// only",
            target.url
        )));
    }
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Failure::usage(format!("bad --node {}: {e}", target.url)))?
        .connect_timeout(target.timeout)
        .tcp_nodelay(true);
    if use_tls {
        endpoint = endpoint
            .tls_config(tls_config(&target.tls)?)
            .map_err(|e| Failure::usage(format!("TLS: {}", error_chain(&e))))?;
    }
    let channel = match tokio::time::timeout(target.timeout, endpoint.connect()).await {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => {
            return Err(Failure::unavailable(format!(
                "cannot reach {url}: {}",
                error_chain(&e)
            )))
        }
        Err(_) => {
            return Err(Failure::unavailable(format!(
                "cannot reach {url}: no connection within {}s",
                target.timeout.as_secs_f64()
            )))
        }
    };
    let auth = Auth {
        bearer,
        timeout: target.timeout,
    };
    Ok(Conn {
        admin: AdminClient::with_interceptor(channel, auth),
        guard: Guard {
            url,
            timeout: target.timeout,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_turns_http_urls_into_https() {
        assert_eq!(dial_url("http://n1:7450", true), "https://n1:7450");
        assert_eq!(dial_url("http://n1:7450", false), "http://n1:7450");
        assert_eq!(dial_url("https://n1:7450", true), "https://n1:7450");
        assert_eq!(dial_url("https://n1:7450", false), "https://n1:7450");
        assert_eq!(dial_url("127.0.0.1:7450", false), "http://127.0.0.1:7450");
        assert_eq!(dial_url("n1:7450", true), "https://n1:7450");
    }

    #[test]
    fn statuses_map_to_exit_codes_and_plain_words() {
        let f = Failure::from_status("http://n1", &Status::unauthenticated("no token"));
        assert_eq!(f.code, EX_REFUSED);
        assert!(f.message.starts_with("permission denied: unauthenticated"));
        let f = Failure::from_status("http://n1", &Status::permission_denied("bad token"));
        assert_eq!(f.message, "permission denied: bad token");
        let f = Failure::from_status("http://n1", &Status::unavailable("no leader"));
        assert_eq!(f.code, EX_UNAVAILABLE);
        assert_eq!(f.message, "http://n1 unavailable: no leader");
        // Broken connections carry their cause; statuses from a node do not.
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "broken pipe",
        )));
        let f = Failure::from_status("http://n1", &broken);
        assert_eq!(f.code, EX_UNAVAILABLE);
        assert!(
            f.message
                .starts_with("connection to http://n1 lost: broken pipe")
                && f.message.ends_with("(if the node uses TLS, give --tls-ca)"),
            "{}",
            f.message
        );
        let f = Failure::from_status("http://n1", &Status::invalid_argument("a.txt:1:1: x"));
        assert_eq!((f.code, f.message.as_str()), (1, "invalid: a.txt:1:1: x"));
    }

    #[test]
    fn tokens_are_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(read_token(&path).unwrap_err().code, EX_USAGE);
        assert_eq!(
            read_token(&dir.path().join("absent")).unwrap_err().code,
            EX_USAGE
        );
    }

    #[test]
    fn error_chains_say_each_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        assert_eq!(error_chain(&e), "transport error: Connection refused");
    }
}
