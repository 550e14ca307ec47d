//! An mTLS gRPC channel to a broker, for the CLI, the bench and tests.

use std::{path::Path, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity;

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker address is not a `https://host:port` URL.
    #[error("broker address {0:?} must look like https://host:port")]
    Address(String),
    /// The SVID, key or bundle files could not be used.
    #[error("client TLS: {0}")]
    Tls(String),
    /// The connection failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The broker address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// Where a client's SVID and trust bundle are.
#[derive(Debug, Clone)]
pub struct ClientFiles<'a> {
    /// PEM bundle the broker's certificate must chain to.
    pub bundle: &'a Path,
    /// The client's X509-SVID chain (PEM).
    pub cert: &'a Path,
    /// The client's private key (PEM).
    pub key: &'a Path,
}

/// Connects to `broker` (`https://host:port`) over mutual TLS with `files`.
///
/// # Errors
/// [`ClientError`] if the address or files are unusable, or the first
/// connection fails.
pub async fn connect(broker: &str, files: &ClientFiles<'_>) -> Result<Channel, ClientError> {
    let tls = identity::client_tls_config(files.bundle, files.cert, files.key)
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    connect_with(broker, tls).await
}

/// Connects to `broker` with a ready-made rustls client config (ALPN `h2`).
///
/// tonic cannot take a rustls config directly, so TLS is done in a connector
/// and tonic sees a plain byte stream.
///
/// # Errors
/// [`ClientError`] if the address is unusable or the first connection fails.
pub async fn connect_with(
    broker: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ClientError> {
    let bad = || ClientError::Address(broker.to_owned());
    let rest = broker.strip_prefix("https://").ok_or_else(bad)?;
    let uri: Uri = format!("http://{rest}").parse().map_err(|_| bad())?;
    let host = uri
        .host()
        .ok_or_else(bad)?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().ok_or_else(bad)?;
    let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
    let connector = TlsConnector::from(tls);
    let endpoint = Endpoint::from(uri)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true);
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let host = host.clone();
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            addr: broker.to_owned(),
            reason: error_chain(&e),
        })
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
