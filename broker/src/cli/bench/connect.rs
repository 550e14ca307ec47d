//! `--mode connect` (a new mTLS connection per task) and its ceiling, a raw
//! rustls full-handshake loop on loopback with the same kind of certificates.

use std::{collections::HashMap, sync::Arc, time::Duration, time::Instant};

use leash_proto::v1::broker_client::BrokerClient;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{CommandError, Ctx, Report, Samples, Stop};
use crate::{
    cli::client,
    identity::{self, SpiffeId, pki::DevCa},
};

fn err(what: &str, e: impl std::fmt::Display) -> CommandError {
    CommandError::Bench(format!("{what}: {e}"))
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CommandError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| err("certificate PEM", e))
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, CommandError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| err("key PEM", e))
}

/// Full mTLS handshakes per second at each concurrency: an in-process rustls
/// server verifying client certificates (webpki, one CA), clients with
/// resumption off, each handshake followed by one byte from the server so the
/// server's verification of the client is inside the timed part.
pub(super) async fn raw_handshakes(
    concurrency: &[usize],
    duration: Duration,
) -> Result<HashMap<usize, f64>, CommandError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let day = Duration::from_secs(86_400);
    let ca = DevCa::generate("bench.test", day).map_err(|e| err("CA", e))?;
    let server_cert = ca
        .issue_server_cert(day)
        .map_err(|e| err("server cert", e))?;
    let id = SpiffeId::parse("spiffe://bench.test/agent/bench").map_err(|e| err("id", e))?;
    let svid = ca.issue_svid(&id, day).map_err(|e| err("SVID", e))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca.cert_pem())? {
        roots.add(c).map_err(|e| err("root", e))?;
    }
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| err("client verifier", e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| err("server config", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&server_cert.cert_pem)?, key(&server_cert.key_pem)?)
        .map_err(|e| err("server config", e))?;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("client config", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(&svid.cert_pem)?, key(&svid.key_pem)?)
        .map_err(|e| err("client config", e))?;
    client.resumption = rustls::client::Resumption::disabled();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| err("bind", e))?;
    let addr = listener.local_addr().map_err(|e| err("bind", e))?;
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"k").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    let connector = TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from("localhost").map_err(|e| err("server name", e))?;
    let mut out = HashMap::new();
    for &c in concurrency {
        let stop = Stop::new(duration, u64::MAX);
        let (samples, elapsed) = super::drive(c, &stop, |_, stop| {
            let (connector, name) = (connector.clone(), name.clone());
            async move {
                let mut s = Samples::default();
                while stop.go() {
                    let t = Instant::now();
                    let ok = async {
                        let tcp = TcpStream::connect(addr).await.ok()?;
                        let _ = tcp.set_nodelay(true);
                        let mut tls = connector.connect(name.clone(), tcp).await.ok()?;
                        let mut b = [0u8; 1];
                        tls.read_exact(&mut b).await.ok()
                    }
                    .await;
                    match ok {
                        Some(_) => s.ok("handshake", t.elapsed()),
                        None => s.failed(&tonic::Status::unavailable("handshake failed")),
                    }
                }
                s
            }
        })
        .await;
        let n = samples.calls.get("handshake").map_or(0, Vec::len);
        out.insert(c, super::per_second(n, elapsed));
    }
    server_task.abort();
    Ok(out)
}

/// Whether a second connection to the broker with the same client config
/// resumed the first one's TLS session.
async fn resumption_probe(
    broker: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<String, CommandError> {
    let rest = broker.strip_prefix("https://").unwrap_or(broker);
    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h).to_owned();
    let connector = TlsConnector::from(tls);
    let name = ServerName::try_from(host).map_err(|e| err("server name", e))?;
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(rest)
            .await
            .map_err(|e| err("connect", e))?;
        let mut tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| err("TLS", e))?;
        kinds.push(format!("{:?}", tls.get_ref().1.handshake_kind()));
        // Read the server's first bytes (its HTTP/2 settings, and in TLS 1.3
        // the session tickets before them), so the ticket reaches the cache.
        let mut b = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_millis(500), tls.read(&mut b)).await;
    }
    Ok(format!("handshakes: {}", kinds.join(" then ")))
}

pub(super) async fn measure(
    ctx: &Ctx,
    report: &mut Report,
    handshakes: Option<&HashMap<usize, f64>>,
) -> Result<(), CommandError> {
    let (ca, cert, key) = ctx.args.connect.files("agent");
    let tls = identity::client_tls_config(&ca, &cert, &key).map_err(|e| err("client TLS", e))?;
    let probe = resumption_probe(&ctx.args.connect.broker, Arc::clone(&tls)).await?;
    for &c in &ctx.args.concurrency {
        let rows = ctx
            .measure(c, |i, stop| {
                let (tls, broker, request) = (
                    Arc::clone(&tls),
                    ctx.args.connect.broker.clone(),
                    ctx.begin_request(0, i),
                );
                async move {
                    let mut s = Samples::default();
                    while stop.go() {
                        let t = Instant::now();
                        let channel = match client::connect_with(&broker, Arc::clone(&tls)).await {
                            Ok(ch) => ch,
                            Err(e) => {
                                s.failed(&tonic::Status::unavailable(e.to_string()));
                                continue;
                            }
                        };
                        match BrokerClient::new(channel).begin_task(request.clone()).await {
                            Ok(_) => s.ok("connect + BeginTask", t.elapsed()),
                            Err(e) => s.failed(&e),
                        }
                    }
                    s
                }
            })
            .await;
        for mut row in rows {
            row.name = "connect + BeginTask (new conn)".into();
            if let Some(h) = handshakes.and_then(|h| h.get(&c)) {
                row.against("raw rustls handshake", *h, Some(0.8));
            }
            row.note = probe.clone();
            report.rows.push(row);
        }
    }
    Ok(())
}
