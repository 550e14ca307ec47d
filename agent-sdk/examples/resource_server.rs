//! A resource server that accepts only Leash credentials, verified offline.
//!
//! It serves gRPC health behind [`VerifierLayer`]: every call must carry
//! `authorization: Bearer <leash jwt>` for this audience with the required scope;
//! revoked tokens are refused the moment the broker's revocation stream says so.
//!
//! ```sh
//! leash dev                                   # in one terminal
//! cargo run -p leash-sdk --example resource_server -- \
//!     --audience https://api.github.example --scope repo:acme/widgets:read
//! ```
//!
//! The server connects to the broker as the dev resource-server SVID
//! (`.leash-dev/resource.pem`), which `leash dev` allows to watch revocations.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use leash_sdk::verifier::{Verifier, VerifierConfig, VerifierLayer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Endpoint, Identity, Server, ServerTlsConfig, Uri};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = arg("--dev-dir", ".leash-dev");
    let broker: SocketAddr = arg("--broker", "127.0.0.1:8443").parse()?;
    let listen: SocketAddr = arg("--listen", "127.0.0.1:9443").parse()?;
    let audience = arg("--audience", "https://api.github.example");
    let scope = arg("--scope", "repo:acme/widgets:read");

    // An mTLS channel to the broker with the resource server's SVID.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(format!("{dir}/bundle.pem"))? {
        roots.add(c?)?;
    }
    let certs = CertificateDer::pem_file_iter(format!("{dir}/resource.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/resource-key.pem"))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let channel = Endpoint::from_shared(format!("http://{broker}"))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(broker).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
                    .await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(TokioIo::new(tls))
            }
        }))
        .await?;

    let verifier = Verifier::connect(
        channel,
        VerifierConfig::new(audience.clone(), "https://localhost:8444"),
    )
    .await?;
    eprintln!("resource server for {audience} on {listen}; requires scope {scope:?}");
    let (_reporter, health) = tonic_health::server::health_reporter();
    // Mutual TLS, so the token's `cnf.x5t#S256` binding is checked against the
    // caller's SVID. For the demo the server borrows the dev broker's certificate
    // (DNS SAN localhost); a real resource server has its own.
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(format!("{dir}/broker.pem"))?,
            std::fs::read(format!("{dir}/broker-key.pem"))?,
        ))
        .client_ca_root(Certificate::from_pem(std::fs::read(format!(
            "{dir}/bundle.pem"
        ))?));
    Server::builder()
        .tls_config(tls)?
        .timeout(Duration::from_secs(10))
        .layer(VerifierLayer::new(verifier, Some(&scope)))
        .add_service(health)
        .serve(listen)
        .await?;
    Ok(())
}
