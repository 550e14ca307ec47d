//! A test-only SPIFFE Workload API server (SPIRE cannot be installed here).
//!
//! It implements `SpiffeWorkloadAPI` from `proto/workload.proto` over a Unix
//! socket in a temporary directory, serves one workload's X.509-SVID (issued by
//! the test CA) and the trust bundle, requires the `workload.spiffe.io: true`
//! header as the specification does, and pushes a new SVID to every open stream
//! when the test calls [`TestWorkloadApi::rotate`].

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use leash_broker::identity::{SpiffeId, pki::IssuedCert};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, pem::PemObject as _};
use tokio::{net::UnixListener, sync::watch, task::JoinHandle};
use tokio_stream::{Stream, StreamExt as _, wrappers::UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::TestPki;

/// Generated from `proto/workload.proto`.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("_");
}

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

/// What one workload is served: its SVID (chain DER, key PKCS#8 DER) and bundle.
#[derive(Debug, Clone)]
struct Material {
    spiffe_id: String,
    chain: Vec<u8>,
    key: Vec<u8>,
    leaf: Vec<u8>,
    bundle: Vec<u8>,
}

/// Which kind of SVID a test Workload API hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidKind {
    /// A client SVID: the URI SAN only.
    Client,
    /// A serving SVID: URI SAN plus DNS `localhost` and IP `127.0.0.1`.
    Serving,
}

/// A running test Workload API for one workload.
pub struct TestWorkloadApi {
    /// `unix:///...` endpoint for `SPIFFE_ENDPOINT_SOCKET` or configuration.
    pub endpoint: String,
    pki: Arc<TestPki>,
    spiffe_id: SpiffeId,
    kind: SvidKind,
    tx: Arc<watch::Sender<Material>>,
    server: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl TestWorkloadApi {
    /// Serves `spiffe://acme.test/<path>` issued by `pki`'s CA.
    pub async fn start(pki: Arc<TestPki>, path: &str, kind: SvidKind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let spiffe_id =
            SpiffeId::parse(&format!("spiffe://{}/{path}", crate::TRUST_DOMAIN)).unwrap();
        let material = issue(&pki, &spiffe_id, kind);
        let (tx, _) = watch::channel(material);
        let tx = Arc::new(tx);
        let listener = UnixListener::bind(&socket).unwrap();
        let service = Service {
            tx: Arc::clone(&tx),
        };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(service))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        });
        Self {
            endpoint: format!("unix://{}", socket.display()),
            pki,
            spiffe_id,
            kind,
            tx,
            server,
            _dir: dir,
        }
    }

    /// Issues a fresh SVID (new key, new serial) and pushes it to every open
    /// stream; returns the new leaf certificate (DER).
    pub fn rotate(&self) -> Vec<u8> {
        let material = issue(&self.pki, &self.spiffe_id, self.kind);
        let leaf = material.leaf.clone();
        self.tx.send_replace(material);
        leaf
    }

    /// The leaf certificate (DER) currently served.
    pub fn leaf(&self) -> Vec<u8> {
        self.tx.borrow().leaf.clone()
    }

    /// The SPIFFE ID served.
    pub fn spiffe_id(&self) -> String {
        self.spiffe_id.to_string()
    }
}

impl Drop for TestWorkloadApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn issue(pki: &TestPki, id: &SpiffeId, kind: SvidKind) -> Material {
    let validity = Duration::from_secs(3600);
    let IssuedCert { cert_pem, key_pem } = match kind {
        SvidKind::Client => pki.ca.issue_svid(id, validity),
        SvidKind::Serving => pki.ca.issue_serving_svid(id, validity),
    }
    .unwrap();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let bundle = CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).unwrap();
    Material {
        spiffe_id: id.to_string(),
        chain: certs.iter().flat_map(|c| c.as_ref().to_vec()).collect(),
        key: key.secret_pkcs8_der().to_vec(),
        leaf: certs[0].as_ref().to_vec(),
        bundle: bundle.as_ref().to_vec(),
    }
}

struct Service {
    tx: Arc<watch::Sender<Material>>,
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The SPIFFE Workload API requires this header on every call, so that a
/// browser or proxy cannot be tricked into calling the socket (SSRF).
fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get("workload.spiffe.io") {
        Some(v) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

impl Service {
    fn follow<T: Send + 'static>(
        &self,
        render: impl Fn(&Material) -> T + Send + 'static,
    ) -> Streamed<T> {
        let rx = self.tx.subscribe();
        let stream = tokio_stream::wrappers::WatchStream::new(rx).map(move |m| Ok(render(&m)));
        Box::pin(stream)
    }
}

fn trust_domain_key() -> String {
    format!("spiffe://{}", crate::TRUST_DOMAIN)
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = Streamed<pb::X509svidResponse>;
    type FetchX509BundlesStream = Streamed<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Streamed<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.follow(|m| pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: m.spiffe_id.clone(),
                x509_svid: m.chain.clone(),
                x509_svid_key: m.key.clone(),
                bundle: m.bundle.clone(),
                hint: String::new(),
            }],
            crl: vec![],
            federated_bundles: HashMap::new(),
        })))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.follow(|m| pb::X509BundlesResponse {
            crl: vec![],
            bundles: HashMap::from([(trust_domain_key(), m.bundle.clone())]),
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(
            "this test Workload API serves X.509-SVIDs only",
        ))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(
            "this test Workload API serves X.509-SVIDs only",
        ))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(
            "this test Workload API serves X.509-SVIDs only",
        ))
    }
}
