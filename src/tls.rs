//! Mutual TLS between nodes, and from milters and `relayratectl` to a
//! node. One set of files serves both ends: a node presents its
//! certificate to clients and to the peers it calls, and accepts only
//! clients whose certificate the client CA signed.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Where a node's TLS files are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate (chain) this end presents.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA that signs the certificates of the other end.
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a PEM file")]
    NotPem(PathBuf),
    #[error("TLS needs --tls-cert, --tls-key and --tls-client-ca together")]
    Incomplete,
}

/// TLS material, read and checked once at start.
#[derive(Clone, Debug)]
pub struct Tls {
    identity: Option<Identity>,
    ca: Certificate,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NotPem(path.to_path_buf()));
    }
    Ok(bytes)
}

impl Tls {
    /// Both ends: this node's certificate and key, and the CA of the
    /// other end.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let cert = read_pem(&files.cert)?;
        let key = read_pem(&files.key)?;
        Ok(Tls {
            identity: Some(Identity::from_pem(cert, key)),
            ca: Certificate::from_pem(read_pem(&files.ca)?),
        })
    }

    /// A client: the CA of the server, and a certificate if the server
    /// asks for one.
    pub fn client(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Tls, TlsError> {
        let identity = match identity {
            Some((cert, key)) => Some(Identity::from_pem(read_pem(cert)?, read_pem(key)?)),
            None => None,
        };
        Ok(Tls {
            identity,
            ca: Certificate::from_pem(read_pem(ca)?),
        })
    }

    /// Builds the node's TLS options from three optional paths: all or none.
    pub fn from_options(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<Tls>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Tls::load(&TlsFiles { cert, key, ca }).map(Some),
            _ => Err(TlsError::Incomplete),
        }
    }

    /// The server side: a client without a certificate signed by the CA is
    /// refused during the handshake.
    pub fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().client_ca_root(self.ca.clone());
        match &self.identity {
            Some(id) => config.identity(id.clone()),
            None => config,
        }
    }

    pub fn client_config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone());
        match &self.identity {
            Some(id) => config.identity(id.clone()),
            None => config,
        }
    }
}

/// An endpoint for `addr` (HOST:PORT or a URL): https with `tls`, else
/// plain http.
pub fn endpoint(addr: &str, tls: Option<&Tls>) -> Result<Endpoint, tonic::transport::Error> {
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    match tls {
        Some(tls) => {
            Endpoint::from_shared(format!("https://{bare}"))?.tls_config(tls.client_config())
        }
        None => Endpoint::from_shared(format!("http://{bare}")),
    }
}
