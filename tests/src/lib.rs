//! Harness for Leash end-to-end tests: real components only.
//!
//! - [`RedisServer`]: a `redis-server` child on a free loopback port (never the
//!   default 6379), with AOF on so a stop/start keeps its data, stopped by PID
//!   when dropped. `LEASH_TEST_REDIS_SERVER` names the binary (default: on PATH).
//! - [`TestPki`]: a throwaway CA for `acme.test` and real X509-SVIDs.
//! - [`TestBroker`]: the real broker, in process, on port-0 listeners, built from
//!   a real TOML config; [`TestBroker::broker`] and [`TestBroker::verifier`]
//!   connect over mutual TLS with an SVID for any SPIFFE path.
//! - [`logs`]: everything every broker in this test process logged, at TRACE,
//!   so tests can assert no credential value ever reached a log.
#![allow(missing_docs)]

pub mod workload_api;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener as StdListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use leash_broker::{
    cli::client,
    config::Config,
    identity::{SpiffeId, client_tls_config, pki::DevCa},
    server,
};
use leash_proto::v1::{broker_client::BrokerClient, verifier_client::VerifierClient};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub use leash_proto::v1 as pb;

/// The trust domain of the test PKI.
pub const TRUST_DOMAIN: &str = "acme.test";

// ---------------------------------------------------------------- logs

#[derive(Clone)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// Installs the process-wide log capture (TRACE for leash, DEBUG elsewhere). Idempotent.
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = LogSink(buf.clone());
        let filter = tracing_subscriber::EnvFilter::new(
            "debug,leash_broker=trace,leash::audit=trace,h2=info,hyper=info,tower=info",
        );
        // The broker's own text field format, so tests see what production logs,
        // and its OpenTelemetry layer (inert unless a broker has `[telemetry]`).
        use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .fmt_fields(leash_broker::logging::EscapedFields)
                    .with_writer(move || sink.clone()),
            )
            .with(leash_broker::telemetry::layer())
            .try_init();
        buf
    });
}

/// Everything logged so far in this process.
pub fn logs() -> String {
    LOGS.get()
        .map(|b| String::from_utf8_lossy(&b.lock().unwrap()).into_owned())
        .unwrap_or_default()
}

/// Asserts that none of `values` (or their distinctive secret parts) appears in the logs.
pub fn assert_not_logged(values: &[String]) {
    let logs = logs();
    for v in values {
        assert!(!v.is_empty());
        assert!(
            !logs.contains(v.as_str()),
            "a credential value reached the logs"
        );
        // The signature part of a JWT or the secret part of an opaque token alone.
        if let Some((_, tail)) = v.rsplit_once('.')
            && tail.len() >= 20
        {
            assert!(
                !logs.contains(tail),
                "a credential secret part reached the logs"
            );
        }
    }
}

/// A plain HTTP/1.1 GET of `path` at `addr`: the status and the body (bounded
/// by a 10 s timeout); status 0 if nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

/// An HTTP/1.1 answer: status, lower-cased header lines, body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// One HTTP/1.1 request over TLS to `localhost:port` (ALPN `http/1.1`),
/// trusting `bundle`, presenting `client` (cert, key) when given: a client
/// of its own, independent of the broker's code. Panics on transport errors.
pub async fn https_request(
    port: u16,
    bundle: &Path,
    client: Option<(&Path, &Path)>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> HttpAnswer {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(bundle).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = content_type {
        request.push_str(&format!("Content-Type: {t}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // A close_notify-less close is fine here: the length is in the headers.
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpAnswer {
        status,
        headers,
        body,
    }
}

/// `application/x-www-form-urlencoded` of `pairs` (RFC 3986 unreserved kept).
pub fn form(pairs: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

// ---------------------------------------------------------------- redis

/// Picks a free loopback port that is not Redis's default.
pub fn free_port() -> u16 {
    loop {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port != 6379 {
            return port;
        }
    }
}

/// A `redis-server` owned by one test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Settings replacing the defaults (AOF with `appendfsync always`).
    args: Vec<String>,
    /// The TLS port, when started with [`RedisServer::start_tls`].
    tls_port: Option<u16>,
}

/// A task whose lease falls due 1 ms after `now`, with `grants` opaque
/// credentials: the backlog the reaper drains (`tests/backlog.rs`,
/// `examples/reaper_rate.rs`). `n` and `tag` make its id (spread over the
/// shards like random ids); it lives at most `max_lifetime_ms`.
pub fn due_lease(
    n: u32,
    tag: u8,
    grants: u8,
    now: u64,
    max_lifetime_ms: u64,
) -> (
    leash_broker::store::TaskRecord,
    Vec<leash_broker::store::CredentialRecord>,
) {
    use leash_broker::store::{
        CredentialId, CredentialRecord, StoredKind, TaskId, TaskRecord, TaskState,
    };
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    bytes[4] = tag;
    bytes[0] = bytes[3].wrapping_mul(17) ^ bytes[2];
    let id = TaskId::from_bytes(bytes);
    let owner = "spiffe://acme.test/agent/backlog";
    let credentials = (0..grants)
        .map(|g| CredentialRecord {
            actors: Vec::new(),
            id: CredentialId::new(&id, [g; 8]),
            grant: format!("g{g}"),
            kind: StoredKind::Opaque,
            audience: "https://api.example".into(),
            scopes: vec!["read".into()],
            scope_classes: vec![leash_broker::templates::ScopeClass::Read],
            value_sha256: leash_broker::credentials::value_digest("not-a-secret"),
            subject: owner.into(),
            issuer: "https://leash.test".into(),
            template: "review".into(),
            cnf_x5t_s256: None,
            tenant: String::new(),
            issued_at_ms: now,
            expires_at_ms: now + max_lifetime_ms,
        })
        .collect();
    let task = TaskRecord {
        id,
        owner: owner.into(),
        template: "review".into(),
        template_version: "1".into(),
        parameters: std::collections::BTreeMap::new(),
        intent: "backlog".into(),
        fingerprint: "f".into(),
        created_at_ms: now,
        lease_ttl_ms: 1,
        lease_deadline_ms: now + 1,
        max_deadline_ms: now + max_lifetime_ms,
        state: TaskState::Active,
        ended_at_ms: None,
        outcome: None,
        binding: Default::default(),
        class: String::new(),
        tenant: String::new(),
        parent: None,
        root: None,
        depth: 0,
        actors: Vec::new(),
        delegated: None,
        approval: None,
        policies: Vec::new(),
    };
    (task, credentials)
}

/// TLS material for test Redis servers: a throwaway CA and a server
/// certificate for `localhost` and `127.0.0.1` (server and client auth), as
/// files `redis-server` reads.
pub struct RedisTls {
    dir: tempfile::TempDir,
    /// The CA certificate (PEM): what a client must trust (`[store] ca_file`).
    pub ca_pem: String,
}

impl RedisTls {
    /// Generates the CA and the server certificate.
    pub fn generate() -> Self {
        let day = Duration::from_secs(86_400);
        let ca = DevCa::generate("redis.test", day).unwrap();
        // serverAuth and clientAuth: a Cluster node presents it on the bus as
        // a client too (with serverAuth alone the nodes never meet).
        let id = SpiffeId::parse("spiffe://redis.test/redis").unwrap();
        let server = ca.issue_serving_svid(&id, day).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.path().join("server-key.pem"), &server.key_pem).unwrap();
        Self {
            ca_pem: ca.cert_pem().to_owned(),
            dir,
        }
    }

    /// The CA file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `redis-server` arguments serving TLS on `port` (clients are not asked
    /// for certificates; a Cluster's bus speaks TLS too).
    fn server_args(&self, port: u16) -> Vec<String> {
        let f = |n: &str| self.dir.path().join(n).display().to_string();
        vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            f("server.pem"),
            "--tls-key-file".into(),
            f("server-key.pem"),
            "--tls-ca-cert-file".into(),
            f("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }
}

/// The ACL rules of the user Leash connects as (`[store] username`) with
/// `store.prefix` `prefix`, as the README documents them: only the keys under
/// the prefix and only the commands the store sends (add `+waitaof` on Redis
/// 7.2 and later, where the store uses it).
pub fn leash_acl(prefix: &str) -> String {
    format!(
        "on resetkeys ~{prefix}* ~{{{prefix}* resetchannels -@all +@read +@write +@scripting \
         +@connection +info +config|get +time +wait +memory|usage +object|encoding +role \
         +cluster|slots +cluster|shards +cluster|nodes +cluster|info +readonly"
    )
}

fn redis_binary() -> String {
    std::env::var("LEASH_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// Sends one inline command and returns the first reply line.
fn redis_command(port: u16, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

impl RedisServer {
    /// Starts a fresh server on a free port. Panics with a clear message if
    /// `redis-server` is missing (the README's test command installs it).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a fresh server with extra `redis-server` arguments after the
    /// defaults (later ones win), e.g. `["--appendfsync", "everysec"]`.
    pub fn start_with(args: &[&str]) -> Self {
        for _ in 0..5 {
            let mut me = Self {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                tls_port: None,
            };
            if me.spawn() {
                return me;
            }
        }
        panic!("could not start redis-server on a free port after 5 tries");
    }

    /// Starts a fresh server that also serves TLS with `tls`'s certificate on
    /// a port of its own ([`Self::tls_url`]); the plain port stays for the
    /// harness's own checks.
    pub fn start_tls(tls: &RedisTls, args: &[&str]) -> Self {
        for _ in 0..5 {
            let tls_port = free_port();
            let mut all = tls.server_args(tls_port);
            all.extend(args.iter().map(|a| (*a).to_owned()));
            let mut me = Self {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                args: all,
                tls_port: Some(tls_port),
            };
            if me.spawn() {
                return me;
            }
        }
        panic!("could not start redis-server with TLS on free ports after 5 tries");
    }

    /// `rediss://localhost:<tls port>/0`, when started with [`Self::start_tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://localhost:{p}/0"))
    }

    /// The TLS port, when started with [`Self::start_tls`].
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// Creates the ACL `users` (name, password, rules such as [`leash_acl`]),
    /// has the server replicate from its master as `replicate_as` (user,
    /// password) when given, then switches the passwordless default user off:
    /// from here on only authenticated clients get in (the harness's own
    /// checks too, so call this last).
    pub fn require_users(
        &self,
        users: &[(&str, &str, String)],
        replicate_as: Option<(&str, &str)>,
    ) {
        let port = self.port.to_string();
        if let Some((user, password)) = replicate_as {
            for (k, v) in [("masteruser", user), ("masterauth", password)] {
                let out = redis_cli(&["-p", &port, "CONFIG", "SET", k, v]);
                assert_eq!(out.trim(), "OK", "CONFIG SET {k}: {out}");
            }
        }
        for (user, password, rules) in users {
            let mut args = vec!["-p", &port, "ACL", "SETUSER", user, "reset"];
            let pass = format!(">{password}");
            args.push(&pass);
            args.extend(rules.split_whitespace());
            let out = redis_cli(&args);
            assert_eq!(out.trim(), "OK", "ACL SETUSER {user}: {out}");
        }
        let out = redis_cli(&["-p", &port, "ACL", "SETUSER", "default", "off"]);
        assert_eq!(out.trim(), "OK", "ACL SETUSER default off: {out}");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new(redis_binary())
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .args(["--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"])
            .args(&self.args)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {}: {e}. Install it (apt-get install -y redis-server) or use the README test command", redis_binary())
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if redis_command(self.port, "PING").is_ok_and(|r| r == "+PONG") {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs (to stop or kill it like a fault).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL, like a crash); AOF keeps what it acknowledged.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Starts the server again on the same port and data with other extra
    /// arguments (e.g. `["--replicaof", host, port]` for a master that comes
    /// back after its replica was promoted).
    pub fn restart_with(&mut self, args: &[&str]) {
        self.kill();
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Kills the server, throws its data away and starts it again on the same
    /// port: a Redis that came back (or was failed over to) with less history.
    pub fn restart_empty(&mut self) {
        self.kill();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Runs one inline command (for inspecting what the broker stored).
    pub fn command(&self, cmd: &str) -> String {
        redis_command(self.port, cmd).unwrap()
    }

    /// Every key and value in the server, as text (for "no secret in the
    /// store" checks): hashes, sorted sets, strings, sets, lists and every
    /// stream entry's fields. Keys in order, hash fields and set members
    /// sorted: two dumps of the same state are equal whatever Redis's
    /// internal order.
    pub fn dump_all(&self) -> String {
        self.dump_matching("")
    }

    /// [`Self::dump_all`] without the audit trail (its streams and indexes):
    /// the state a refused request must leave as it was (a refusal is
    /// recorded in the trail, and changes nothing else).
    pub fn dump_state(&self) -> String {
        self.dump_matching("if string.find(k, '}:audit:', 1, true) or string.find(k, '}:tev:', 1, true) then t = 'skip' end")
    }

    fn dump_matching(&self, skip: &str) -> String {
        let mut out = String::new();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let script = format!(
            "local o={{}} local ks=redis.call('KEYS','*') table.sort(ks) for _,k in ipairs(ks) do local t=redis.call('TYPE',k).ok {skip} if t ~= 'skip' then table.insert(o,k) end \
             if t=='hash' then local h=redis.call('HGETALL',k) local p={{}} for i=1,#h,2 do table.insert(p,h[i]..'='..h[i+1]) end table.sort(p) for _,v in ipairs(p) do table.insert(o,v) end \
             elseif t=='zset' then for _,v in ipairs(redis.call('ZRANGE',k,0,-1)) do table.insert(o,v) end \
             elseif t=='set' then local m=redis.call('SMEMBERS',k) table.sort(m) for _,v in ipairs(m) do table.insert(o,v) end \
             elseif t=='list' then for _,v in ipairs(redis.call('LRANGE',k,0,-1)) do table.insert(o,v) end \
             elseif t=='stream' then for _,e in ipairs(redis.call('XRANGE',k,'-','+')) do for _,v in ipairs(e[2]) do table.insert(o,v) end end \
             elseif t=='string' then table.insert(o,redis.call('GET',k)) end end return o"
        );
        let command = format!("EVAL \"{script}\" 0\r\n");
        s.write_all(command.as_bytes()).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- redis cluster and sentinel

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not happen within {within:?}");
}

/// Runs `redis-cli` with `args` and returns its stdout (panics on failure).
pub fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}. Install it (apt-get install -y redis-tools) or use the README test command"));
    assert!(
        out.status.success(),
        "redis-cli {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis Cluster owned by one test: `masters` masters with `replicas`
/// replicas each, real `redis-server` processes on free loopback ports,
/// created with `redis-cli --cluster create` (node timeout 1 s, so a killed
/// master's replica takes over within a few seconds).
pub struct RedisCluster {
    /// Every node, masters first as created (roles change with failovers).
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts and creates the cluster and waits until every slot is served.
    pub fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, None)
    }

    /// [`Self::start`], with every node also serving TLS with `tls`'s
    /// certificate (`--tls-cluster` and `--tls-replication`: the bus and the
    /// replication speak TLS, and TLS clients are told the TLS ports), the
    /// cluster created over TLS.
    pub fn start_with(masters: usize, replicas: usize, tls: Option<&RedisTls>) -> Self {
        let n = masters * (1 + replicas);
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
        ];
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| match tls {
                Some(tls) => {
                    let mut a = args.to_vec();
                    a.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
                    RedisServer::start_tls(tls, &a)
                }
                None => RedisServer::start_with(&args),
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.tls_port().unwrap_or(n.port())))
            .collect();
        let ca = tls.map(|t| t.ca_file().display().to_string());
        let mut args: Vec<&str> = Vec::new();
        if let Some(ca) = &ca {
            args.extend(["--tls", "--cacert", ca]);
        }
        args.extend(["--cluster", "create"]);
        args.extend(addrs.iter().map(String::as_str));
        let r = replicas.to_string();
        args.extend(["--cluster-replicas", &r, "--cluster-yes"]);
        redis_cli(&args);
        let me = Self { nodes };
        me.wait_healthy(Duration::from_secs(30));
        wait_until("every replica in sync", Duration::from_secs(30), || {
            me.masters().iter().all(|&m| {
                let port = me.nodes[m].port().to_string();
                let info = redis_cli(&["-p", &port, "INFO", "replication"]);
                info.matches("state=online").count() >= replicas
            })
        });
        me
    }

    /// `host:port` of every node's TLS port (with [`Self::start_with`] TLS).
    pub fn tls_seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter_map(|n| n.tls_port().map(|p| format!("localhost:{p}")))
            .collect()
    }

    /// [`RedisServer::require_users`] on every node, each replicating as
    /// `replicate_as`.
    pub fn require_users(
        &self,
        users: &[(&str, &str, String)],
        replicate_as: Option<(&str, &str)>,
    ) {
        for n in &self.nodes {
            n.require_users(users, replicate_as);
        }
    }

    /// The process ids of every node running now.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(RedisServer::pid).collect()
    }

    /// `host:port` of every node, for `[store.cluster] nodes`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect()
    }

    /// Waits until every live node reports `cluster_state:ok`, and every slot is
    /// served by a reachable master.
    pub fn wait_healthy(&self, within: Duration) {
        wait_until("the cluster serving every slot", within, || {
            let alive: Vec<&RedisServer> =
                self.nodes.iter().filter(|n| n.pid().is_some()).collect();
            let ok = alive.iter().all(|n| {
                let info = redis_cli(&["-p", &n.port().to_string(), "CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            });
            ok && !self.masters().is_empty()
        });
    }

    /// Waits until the cluster has failed the master that was at `port` over
    /// to its replica (the node is flagged `fail`, its slots served again).
    pub fn wait_failed_over(&self, port: u16, within: Duration) {
        let needle = format!("127.0.0.1:{port}@");
        wait_until("the cluster failing the master over", within, || {
            let Some(seed) = self.nodes.iter().find(|n| n.pid().is_some()) else {
                return false;
            };
            let text = redis_cli(&["-p", &seed.port().to_string(), "CLUSTER", "NODES"]);
            text.lines().any(|l| {
                l.contains(&needle)
                    && l.split(' ')
                        .nth(2)
                        .is_some_and(|f| f.split(',').any(|x| x == "fail"))
            })
        });
        self.wait_healthy(within);
    }

    /// Indexes in [`Self::nodes`] of the live masters.
    pub fn masters(&self) -> Vec<usize> {
        let Some(seed) = self.nodes.iter().find(|n| n.pid().is_some()) else {
            return Vec::new();
        };
        let text = redis_cli(&["-p", &seed.port().to_string(), "CLUSTER", "NODES"]);
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let (Some(addr), Some(flags)) = (f.get(1), f.get(2)) else {
                continue;
            };
            if !flags.contains("master") || flags.contains("fail") {
                continue;
            }
            let port = addr.split('@').next().and_then(|a| a.rsplit(':').next());
            if let Some(i) = self.nodes.iter().position(|n| {
                let p = |v: u16| Some(v.to_string()).as_deref() == port;
                (p(n.port()) || n.tls_port().is_some_and(p)) && n.pid().is_some()
            }) {
                out.push(i);
            }
        }
        out.sort_unstable();
        out
    }
}

/// A Sentinel-managed Redis owned by one test: a master, `replicas`
/// replicas and `sentinels` Sentinels (quorum 2, `down-after-milliseconds`
/// 1000), real processes on free loopback ports. The monitored name is
/// [`SentinelGroup::NAME`].
pub struct SentinelGroup {
    /// The data nodes; index 0 started as the master (roles change with failovers).
    pub nodes: Vec<RedisServer>,
    sentinels: Vec<(Child, u16, tempfile::TempDir)>,
}

impl SentinelGroup {
    /// The master name the Sentinels monitor.
    pub const NAME: &'static str = "leash-test";

    /// Starts the group and waits until every Sentinel knows the master and
    /// every replica, and the replicas are in sync.
    pub fn start(replicas: usize, sentinels: usize) -> Self {
        let master = RedisServer::start();
        let mport = master.port().to_string();
        let mut nodes = vec![master];
        for _ in 0..replicas {
            nodes.push(RedisServer::start_with(&[
                "--replicaof",
                "127.0.0.1",
                &mport,
            ]));
        }
        let mut me = Self {
            nodes,
            sentinels: Vec::new(),
        };
        for _ in 0..sentinels {
            me.spawn_sentinel(&mport);
        }
        wait_until("the replicas in sync", Duration::from_secs(30), || {
            let info = redis_cli(&["-p", &mport, "INFO", "replication"]);
            info.contains(&format!("connected_slaves:{replicas}"))
                && info.matches("state=online").count() == replicas
        });
        let want = format!("num-other-sentinels\n{}", sentinels - 1);
        let _ = want;
        wait_until(
            "every Sentinel seeing the group",
            Duration::from_secs(30),
            || {
                me.sentinels.iter().all(|(_, port, _)| {
                    let m = redis_cli(&["-p", &port.to_string(), "SENTINEL", "MASTER", Self::NAME]);
                    let lines: Vec<&str> = m.lines().collect();
                    let field = |name: &str| {
                        lines
                            .iter()
                            .position(|l| *l == name)
                            .and_then(|i| lines.get(i + 1))
                            .map(|v| v.to_string())
                    };
                    field("num-slaves").as_deref() == Some(&replicas.to_string())
                        && field("num-other-sentinels").as_deref()
                            == Some(&(sentinels - 1).to_string())
                })
            },
        );
        me
    }

    fn spawn_sentinel(&mut self, master_port: &str) {
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode yes\nloglevel warning\ndir {}\n\
                     sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 4000\n\
                     sentinel parallel-syncs {name} 1\n",
                    dir.path().display(),
                    name = Self::NAME,
                ),
            )
            .unwrap();
            let mut child = Command::new(redis_binary())
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut up = false;
            while Instant::now() < deadline {
                if redis_command(port, "PING").is_ok_and(|r| r == "+PONG") {
                    up = true;
                    break;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if up {
                self.sentinels.push((child, port, dir));
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start a Sentinel on a free port after 5 tries");
    }

    /// Creates the ACL `users` on every data node and switches their default
    /// user off ([`RedisServer::require_users`]): the replicas replicate as
    /// `replica`, and the Sentinels monitor as `sentinel` (user, password;
    /// `SENTINEL SET <name> auth-user`). The Sentinels themselves stay open.
    pub fn require_users(
        &self,
        users: &[(&str, &str, String)],
        replica: (&str, &str),
        sentinel: (&str, &str),
    ) {
        for (_, port, _) in &self.sentinels {
            let port = port.to_string();
            for (k, v) in [("auth-user", sentinel.0), ("auth-pass", sentinel.1)] {
                let out = redis_cli(&["-p", &port, "SENTINEL", "SET", Self::NAME, k, v]);
                assert_eq!(out.trim(), "OK", "SENTINEL SET {k}: {out}");
            }
        }
        for n in &self.nodes {
            n.require_users(users, Some(replica));
        }
    }

    /// The process ids of every data node and Sentinel running now (to stop
    /// all of Redis like a fault).
    pub fn pids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.nodes.iter().filter_map(RedisServer::pid).collect();
        out.extend(self.sentinels.iter().map(|(c, _, _)| c.id()));
        out
    }

    /// `host:port` of every Sentinel, for `[store.sentinel] addresses`.
    pub fn sentinel_addresses(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(_, p, _)| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The port the Sentinels name as the master now.
    pub fn master_port(&self) -> u16 {
        let (_, port, _) = self
            .sentinels
            .iter()
            .find(|(_, p, _)| redis_command(*p, "PING").is_ok())
            .unwrap();
        let out = redis_cli(&[
            "-p",
            &port.to_string(),
            "SENTINEL",
            "get-master-addr-by-name",
            Self::NAME,
        ]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Index in [`Self::nodes`] of the current master.
    pub fn master(&self) -> usize {
        let port = self.master_port();
        self.nodes.iter().position(|n| n.port() == port).unwrap()
    }

    /// Waits until the Sentinels name a master other than the node at `old`
    /// and that node reports itself master.
    pub fn wait_promoted(&self, old: u16, within: Duration) -> u16 {
        let mut now = old;
        wait_until("a replica promoted by the Sentinels", within, || {
            now = self.master_port();
            now != old
                && redis_command(now, "ROLE").is_ok()
                && redis_cli(&["-p", &now.to_string(), "ROLE"]).starts_with("master")
        });
        now
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        for (c, _, _) in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------- pki

/// A CA for `acme.test` and files for the broker's serving certificate.
pub struct TestPki {
    pub ca: DevCa,
    pub dir: tempfile::TempDir,
}

/// Where one client's SVID files are.
#[derive(Debug, Clone)]
pub struct SvidFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub id: String,
}

impl TestPki {
    pub fn new() -> Self {
        let ca = DevCa::generate(TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bundle.pem"), ca.cert_pem()).unwrap();
        let server = ca.issue_server_cert(Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.path().join("broker.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.path().join("broker-key.pem"), &server.key_pem).unwrap();
        Self { ca, dir }
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle.pem")
    }

    /// Issues an SVID for `spiffe://acme.test/<path>` and writes it to files.
    pub fn svid(&self, path: &str) -> SvidFiles {
        let id = format!("spiffe://{TRUST_DOMAIN}/{path}");
        let issued = self
            .ca
            .issue_svid(&SpiffeId::parse(&id).unwrap(), Duration::from_secs(3600))
            .unwrap();
        let stem = path.replace('/', "_");
        let cert = self.dir.path().join(format!("{stem}.pem"));
        let key = self.dir.path().join(format!("{stem}-key.pem"));
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        SvidFiles { cert, key, id }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------- broker

/// The template most tests use: a JWT and an opaque grant, 2 s leases.
pub const REVIEW_TEMPLATE: &str = r#"
name: review
version: "1"
owner: platform@acme.test
description: Review one pull request.
identities:
  - spiffe://acme.test/agent/*
parameters:
  repo:
    type: string
    pattern: "[a-z0-9-]+/[a-z0-9-]+"
    required: true
  env:
    type: string
    enum: [staging, prod]
    required: false
lease:
  ttl: 2s
  max_ttl: 10s
  max_lifetime: 1m
  # The suites renew right after begin; the limit has tests of its own.
  min_renew_interval: 0s
grants:
  - name: github
    kind: jwt
    audience: https://api.github.test
    scopes: [{scope: "repo:{repo}:read", class: read}]
    ttl: 60s
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "db:app:select", class: read}]
    ttl: 60s
"#;

/// A JWT-SVID authority of `acme.test`: a P-256 key (`kid` `k1`) whose JWT bundle
/// a broker's `[jwt_svid]` section trusts, and the JWT-SVIDs it signs.
pub struct JwtSvidAuthority {
    key: ring::signature::EcdsaKeyPair,
}

impl Default for JwtSvidAuthority {
    fn default() -> Self {
        Self::new()
    }
}

impl JwtSvidAuthority {
    pub fn new() -> Self {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self { key }
    }

    /// The JWT bundle (a JWK Set, `use: jwt-svid`).
    pub fn jwks(&self) -> String {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        use ring::signature::KeyPair as _;
        let point = self.key.public_key().as_ref();
        serde_json::json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string()
    }

    /// A JWT-SVID for `spiffe://acme.test/<path>` and `audience`, valid for two minutes.
    pub fn token(&self, path: &str, audience: &str) -> String {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({ "alg": "ES256", "kid": "k1", "typ": "JWT" });
        let claims = serde_json::json!({
            "sub": format!("spiffe://acme.test/{path}"), "aud": audience, "exp": now + 120,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    /// The `[jwt_svid]` section of a broker listening on `port` for `audience`,
    /// trusting this authority (its bundle is written into `dir`).
    pub fn section(&self, dir: &Path, port: u16, audience: &str) -> String {
        let bundle = dir.join("acme.jwks.json");
        std::fs::write(&bundle, self.jwks()).unwrap();
        format!(
            "[jwt_svid]\nlisten = \"127.0.0.1:{port}\"\naudience = \"{audience}\"\nbundles = {{ \"acme.test\" = \"{}\" }}\n",
            bundle.display()
        )
    }
}

/// The text of a file under the repository's `examples/` (e.g. `templates/repo-cleanup.yaml`).
pub fn example_file(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("examples/{path}: {e}"))
}

/// Every `examples/policies/*.cedar` file as (name, text), for [`BrokerOptions::policies`].
pub fn example_policies() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The `[verifier]` body of a test broker unless [`BrokerOptions::verifier_toml`]
/// replaces it: every `spiffe://acme.test/resource/*` may introspect and watch
/// the credentials of every audience a harness template grants —
/// [`REVIEW_TEMPLATE`]'s, the suites' own (`https://api.acme.test`,
/// `https://{a,b,c}.test`) and `examples/templates`'. A suite whose template
/// grants another audience adds it here, or its tokens read as inactive.
pub const DEFAULT_VERIFIER_TOML: &str = r#"callers = [
  { identity = "spiffe://acme.test/resource/*", audiences = [
    "https://api.github.test",
    "postgres://db.acme.test/app",
    "https://api.acme.test",
    "https://a.test",
    "https://b.test",
    "https://c.test",
    "postgres://reporting.acme.test",
  ] },
]"#;

/// The `[actors]` section of a test broker unless [`BrokerOptions::actors_toml`]
/// replaces it: every `spiffe://acme.test/*` identity is of class `any` in
/// tenant `default` (the tenant of templates without `tenant:`), with no limits.
pub const DEFAULT_ACTORS_TOML: &str = r#"[[actors.classes]]
name = "any"
tenant = "default"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/*"]"#;

/// Which store a test broker uses.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    Memory,
    Redis(String),
}

/// Options for [`TestBroker::start`].
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub store: StoreChoice,
    pub templates: Vec<String>,
    pub reaper_interval: &'static str,
    pub reload_interval: &'static str,
    pub extra_toml: String,
    /// Replaces the body of `[tls]` (default: the PKI's files).
    pub tls_toml: Option<String>,
    /// The JWT signing algorithm (default EdDSA).
    pub signing_alg: leash_broker::credentials::Algorithm,
    /// How far this broker's clock is off real time, in ms (replica skew tests).
    pub clock_skew_ms: i64,
    /// Extra lines for the `[store]` section (e.g. `durability = "none"`).
    pub store_toml: String,
    /// Replaces the body of `[verifier]` (default: [`DEFAULT_VERIFIER_TOML`]).
    pub verifier_toml: Option<String>,
    /// Replaces the `[[actors.classes]]` tables (default: [`DEFAULT_ACTORS_TOML`]).
    pub actors_toml: Option<String>,
    /// Cedar policy files (name, text): when not empty, written to `policies/`
    /// beside the templates and configured as `[policy] dir`.
    pub policies: Vec<(String, String)>,
    /// `[policy] time_zone` when `policies` is not empty.
    pub policy_time_zone: &'static str,
}

/// A clock off real time by a fixed amount, like a replica without NTP.
#[derive(Debug)]
pub struct SkewedClock(pub i64);

impl leash_broker::clock::Clock for SkewedClock {
    fn now_ms(&self) -> u64 {
        let real = i64::try_from(leash_broker::clock::SystemClock.now_ms()).unwrap();
        u64::try_from(real + self.0).unwrap()
    }
}

impl BrokerOptions {
    pub fn memory() -> Self {
        Self::with_store(StoreChoice::Memory)
    }

    pub fn redis(redis: &RedisServer) -> Self {
        Self::with_store(StoreChoice::Redis(redis.url()))
    }

    pub fn with_store(store: StoreChoice) -> Self {
        Self {
            store,
            templates: vec![REVIEW_TEMPLATE.to_owned()],
            reaper_interval: "100ms",
            reload_interval: "200ms",
            extra_toml: String::new(),
            tls_toml: None,
            signing_alg: leash_broker::credentials::Algorithm::EdDSA,
            clock_skew_ms: 0,
            store_toml: String::new(),
            verifier_toml: None,
            actors_toml: None,
            policies: Vec::new(),
            policy_time_zone: "UTC",
        }
    }
}

/// A running broker with its own PKI.
pub struct TestBroker {
    pub pki: Arc<TestPki>,
    pub agent_addr: SocketAddr,
    pub ops_addr: SocketAddr,
    pub config_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), server::ServerError>>>,
}

impl TestBroker {
    /// Starts a broker; the prefix keeps brokers sharing one Redis apart unless the same.
    pub async fn start(options: BrokerOptions) -> Self {
        Self::start_with_pki(options, Arc::new(TestPki::new()), "leash").await
    }

    /// Starts a broker with the given PKI and Redis key prefix (replicas share both).
    pub async fn start_with_pki(options: BrokerOptions, pki: Arc<TestPki>, prefix: &str) -> Self {
        capture_logs();
        let config_dir = tempfile::tempdir().unwrap();
        let tpl_dir = config_dir.path().join("templates");
        std::fs::create_dir(&tpl_dir).unwrap();
        for (i, t) in options.templates.iter().enumerate() {
            std::fs::write(tpl_dir.join(format!("t{i}.yaml")), t).unwrap();
        }
        let policy_toml = if options.policies.is_empty() {
            String::new()
        } else {
            let dir = config_dir.path().join("policies");
            std::fs::create_dir(&dir).unwrap();
            for (name, text) in &options.policies {
                std::fs::write(dir.join(name), text).unwrap();
            }
            format!(
                "[policy]\ndir = \"policies\"\ntime_zone = \"{}\"\n",
                options.policy_time_zone
            )
        };
        let (_, signing) =
            leash_broker::credentials::SigningKey::generate("test-1", options.signing_alg).unwrap();
        std::fs::write(config_dir.path().join("signing.pem"), signing).unwrap();
        let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_addr = agent.local_addr().unwrap();
        let ops_addr = ops.local_addr().unwrap();
        let (kind, url) = match &options.store {
            StoreChoice::Memory => ("memory", "redis://127.0.0.1:1/0".to_owned()),
            StoreChoice::Redis(u) => ("redis", u.clone()),
        };
        let toml = format!(
            r#"
[listen]
agent = "{agent_addr}"
ops = "{ops_addr}"
[tls]
{tls}
[templates]
dir = "templates"
{policy_toml}
[signing]
issuer = "https://leash.acme.test"
keys = [{{ kid = "test-1", alg = "{alg}", path = "signing.pem" }}]
[store]
kind = "{kind}"
url = "{url}"
prefix = "{prefix}"
timeout = "500ms"
{store_extra}
[reaper]
interval = "{reaper}"
[verifier]
{verifier}
[reload]
interval = "{reload}"
{extra}
{actors}
"#,
            tls = options.tls_toml.clone().unwrap_or_else(|| format!(
                r#"cert = "{pki}/broker.pem"
key = "{pki}/broker-key.pem"
bundles = {{ "acme.test" = "{pki}/bundle.pem" }}"#,
                pki = pki.dir.path().display()
            )),
            alg = options.signing_alg.as_str(),
            reaper = options.reaper_interval,
            reload = options.reload_interval,
            extra = options.extra_toml,
            store_extra = options.store_toml,
            verifier = options
                .verifier_toml
                .as_deref()
                .unwrap_or(DEFAULT_VERIFIER_TOML),
            actors = options
                .actors_toml
                .as_deref()
                .unwrap_or(DEFAULT_ACTORS_TOML),
        );
        let config = Config::from_toml(&toml, std::iter::empty(), config_dir.path())
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let (tx, rx) = oneshot::channel();
        let clock = Arc::new(SkewedClock(options.clock_skew_ms));
        let handle = tokio::spawn(server::serve_with_clock(config, clock, agent, ops, async {
            let _ = rx.await;
        }));
        Self {
            pki,
            agent_addr,
            ops_addr,
            config_dir,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// A channel to this broker's JWT-SVID listener on `port` (server-authenticated
    /// TLS only), once it accepts connections.
    pub async fn jwt_svid_channel(&self, port: u16) -> Channel {
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(self.pki.bundle()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        let url = format!("https://localhost:{port}");
        let channel = Mutex::new(None);
        let up = eventually(Duration::from_secs(5), || async {
            match client::connect_with(&url, Arc::clone(&config)).await {
                Ok(c) => {
                    *channel.lock().unwrap() = Some(c);
                    true
                }
                Err(_) => false,
            }
        })
        .await;
        assert!(up.is_some(), "the JWT-SVID listener never came up");
        channel.into_inner().unwrap().unwrap()
    }

    /// The policies directory (edit files here to test reloads).
    pub fn policies_dir(&self) -> PathBuf {
        self.config_dir.path().join("policies")
    }

    /// The templates directory (edit files here to test reloads).
    pub fn templates_dir(&self) -> PathBuf {
        self.config_dir.path().join("templates")
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.agent_addr.port())
    }

    /// A channel authenticated as `spiffe://acme.test/<path>`.
    pub async fn channel(&self, path: &str) -> Channel {
        let files = self.pki.svid(path);
        self.channel_with(&files.cert, &files.key).await
    }

    /// A channel with arbitrary certificate and key files.
    pub async fn channel_with(&self, cert: &Path, key: &Path) -> Channel {
        let tls = client_tls_config(&self.pki.bundle(), cert, key).unwrap();
        client::connect_with(&self.url(), tls).await.unwrap()
    }

    pub async fn broker(&self, path: &str) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel(path).await)
    }

    /// An Admin client authenticated as `spiffe://acme.test/<path>`.
    pub async fn admin(&self, path: &str) -> pb::admin_client::AdminClient<Channel> {
        pb::admin_client::AdminClient::new(self.channel(path).await)
    }

    pub async fn verifier(&self, path: &str) -> VerifierClient<Channel> {
        VerifierClient::new(self.channel(path).await)
    }

    /// Waits (at most `within`) for the broker to stop by itself, and returns how
    /// it ended: for brokers expected to refuse to start.
    pub async fn ended(mut self, within: Duration) -> Result<(), server::ServerError> {
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(within, handle)
            .await
            .expect("the broker kept running")
            .unwrap()
    }

    /// Stops the broker and waits for it.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let r = tokio::time::timeout(Duration::from_secs(15), h).await;
            assert!(
                matches!(r, Ok(Ok(Ok(())))),
                "broker did not stop cleanly: {r:?}"
            );
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------- requests

/// A valid BeginTask for [`REVIEW_TEMPLATE`].
pub fn review_request() -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: "review".into(),
        parameters: [("repo".to_owned(), "acme/widgets".to_owned())]
            .into_iter()
            .collect(),
        intent: "review pull request 42".into(),
        requested_ttl: None,
        idempotency_key: String::new(),
    }
}

/// Introspects `token` as the resource server `resource/api`.
pub async fn is_active(broker: &TestBroker, token: &str) -> bool {
    let mut v = broker.verifier("resource/api").await;
    v.introspect(pb::IntrospectRequest {
        token: token.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .active
}

/// Begins a [`review_request`] task as `agent` and completes it at once; returns
/// the begin answer (its credentials are all revoked now).
pub async fn begin_and_complete_task(agent: &mut BrokerClient<Channel>) -> pb::BeginTaskResponse {
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    begun
}

/// [`begin_and_complete_task`], keeping only the (revoked) credentials.
pub async fn begin_and_complete(agent: &mut BrokerClient<Channel>) -> Vec<pb::Credential> {
    begin_and_complete_task(agent).await.credentials
}

/// Starts `WatchRevocations` as `spiffe://acme.test/<path>`; an empty `cursor`
/// asks for a snapshot.
pub async fn watch_revocations(
    broker: &TestBroker,
    path: &str,
    cursor: &str,
) -> Result<tonic::Streaming<pb::RevocationBatch>, tonic::Status> {
    let mut v = broker.verifier(path).await;
    v.watch_revocations(pb::WatchRevocationsRequest {
        cursor: cursor.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The next batch of a revocation stream; panics if none comes within 10 s, the
/// stream ends or fails.
pub async fn next_batch(stream: &mut tonic::Streaming<pb::RevocationBatch>) -> pb::RevocationBatch {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no batch within 10 s")
        .expect("stream error")
        .expect("stream ended")
}

/// Reads batches up to the first `caught_up` one (the end of a snapshot or
/// catch-up); returns every revocation in them and the last cursor.
pub async fn read_until_caught_up(
    stream: &mut tonic::Streaming<pb::RevocationBatch>,
) -> (Vec<pb::Revocation>, String) {
    let mut all = Vec::new();
    loop {
        let b = next_batch(stream).await;
        all.extend(b.revocations);
        if b.caught_up {
            return (all, b.cursor);
        }
    }
}

/// The retry delay a RESOURCE_EXHAUSTED status carries, in ms: the
/// `google.rpc.RetryInfo` in its details, which must agree with the
/// `retry-after-ms` header; panics without either.
pub fn retry_after_ms(status: &tonic::Status) -> u64 {
    use tonic_types::StatusExt as _;
    let header: u64 = status
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after-ms in {status:?}"));
    let detail = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo in the details of {status:?}"));
    let detail_ms = u64::try_from(detail.as_millis()).unwrap();
    assert_eq!(detail_ms, header, "RetryInfo and retry-after-ms disagree");
    header
}

/// Renews `task_id`, waiting out a `RESOURCE_EXHAUSTED` "renewed too soon" answer
/// (a template's minimum renew interval) as the broker's `retry-after-ms` asks (1 s
/// without one), at most 5 times.
pub async fn renew_when_allowed(
    agent: &mut BrokerClient<Channel>,
    task_id: &str,
) -> Result<pb::RenewLeaseResponse, tonic::Status> {
    let mut tries = 0;
    loop {
        let request = pb::RenewLeaseRequest {
            task_id: task_id.to_owned(),
        };
        match agent.renew_lease(request).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted && tries < 5 => {
                tries += 1;
                let wait_ms = s
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1000)
                    .min(5000);
                tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
            }
            other => return other.map(tonic::Response::into_inner),
        }
    }
}

/// Everything in the Redis server as sorted lines of [`RedisServer::dump_all`],
/// for "nothing changed" checks that must not depend on key order.
pub fn store_lines(redis: &RedisServer) -> Vec<String> {
    let mut lines: Vec<String> = redis.dump_state().lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// Polls `f` every 20 ms until it is true or `within` passes; returns the time it took.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A protobuf timestamp in Unix milliseconds, for comparisons.
pub fn ms(ts: Option<prost_types::Timestamp>) -> i64 {
    let ts = ts.expect("timestamp present");
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}
