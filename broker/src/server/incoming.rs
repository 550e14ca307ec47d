//! The TLS accept loop of a listener, bounded so one client — or a flood of
//! half-open connections — cannot exhaust the broker or lock agents out.
//!
//! - Every TLS handshake runs in its own task with a timeout, never in the accept
//!   loop, so a client that stalls mid-handshake delays nobody.
//! - At most `max_connections` connections are open (handshaking or established);
//!   a connection over the cap is closed at accept. The slot is held by the stream
//!   handed to the server and freed when the connection ends.
//! - At most `max_pending_handshakes` handshakes are in progress. When the cap is
//!   reached (or every connection slot is taken), the **oldest** pending handshake
//!   is dropped for the newcomer: a flood of connections that never finish their
//!   handshake then costs each of them its slot, while an agent whose handshake
//!   takes milliseconds completes unless the flood opens more than the cap in that
//!   time. Established connections are never dropped for a newcomer.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    task::{AbortHandle, JoinSet},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::api::PeerConnection;

/// The bounds of one listener (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct IncomingLimits {
    pub(crate) max_connections: usize,
    pub(crate) max_pending_handshakes: usize,
    pub(crate) handshake_timeout: Duration,
}

impl From<&crate::config::Limits> for IncomingLimits {
    fn from(l: &crate::config::Limits) -> Self {
        Self {
            max_connections: l.max_connections,
            max_pending_handshakes: l.max_pending_handshakes.min(l.max_connections),
            handshake_timeout: l.handshake_timeout,
        }
    }
}

/// An established TLS connection holding one of its listener's connection slots
/// until it is dropped.
#[derive(Debug)]
pub struct LimitedTlsStream {
    inner: TlsStream<TcpStream>,
    peer: PeerConnection,
    _slot: OwnedSemaphorePermit,
}

impl LimitedTlsStream {
    fn new(inner: TlsStream<TcpStream>, slot: OwnedSemaphorePermit) -> Self {
        let certs = inner
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        Self {
            inner,
            peer: PeerConnection::new(certs),
            _slot: slot,
        }
    }
}

impl Connected for LimitedTlsStream {
    // One per connection, shared by its calls: the peer's chain, copied once,
    // and the verdict on it (see `SvidAuth`).
    type ConnectInfo = PeerConnection;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for LimitedTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connection slot of a handshake in progress, shared by the accept loop (which
/// may evict the handshake and free the slot at once) and the handshake task (which
/// moves it into the stream). Whoever takes it first ends the handshake's count in
/// `in_progress`, so the count is exact even while an evicted task winds down.
struct Slot {
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    in_progress: Arc<AtomicUsize>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, in_progress: &Arc<AtomicUsize>) -> Arc<Self> {
        in_progress.fetch_add(1, Ordering::SeqCst);
        Arc::new(Self {
            permit: Mutex::new(Some(permit)),
            in_progress: Arc::clone(in_progress),
        })
    }

    fn take(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self
            .permit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if permit.is_some() {
            self.in_progress.fetch_sub(1, Ordering::SeqCst);
        }
        permit
    }
}

/// A handshake in progress, oldest first in the accept loop's queue.
struct Pending {
    slot: Arc<Slot>,
    task: AbortHandle,
}

/// Drops the oldest handshake that still holds a slot; false if there is none.
fn evict_oldest(queue: &mut VecDeque<Pending>) -> bool {
    while let Some(p) = queue.pop_front() {
        if let Some(slot) = p.slot.take() {
            p.task.abort();
            drop(slot);
            return true;
        }
    }
    false
}

/// How often "limit reached" may be logged, so a flood does not flood the log.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Accepts TCP connections on `listener` within `limits` and yields the ones whose
/// TLS handshake completed in time, until `stop` turns true. Failed handshakes (bad
/// SVIDs among them) are logged by the verifier and dropped here.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    stop: watch::Receiver<bool>,
    limits: IncomingLimits,
) -> ReceiverStream<Result<LimitedTlsStream, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        // Dropped on return: every handshake still in progress is aborted.
        let mut handshakes = JoinSet::new();
        let in_progress = Arc::new(AtomicUsize::new(0));
        let mut queue: VecDeque<Pending> = VecDeque::new();
        let mut last_warning: Option<Instant> = None;
        let stop = super::wait_for(stop);
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = &mut stop => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE or a reset before accept; keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            while handshakes.try_join_next().is_some() {}
            // Finished handshakes no longer hold a slot; keep the queue short.
            while queue.front().is_some_and(|p| p.task.is_finished()) {
                queue.pop_front();
            }
            if queue.len() > 2 * limits.max_pending_handshakes {
                queue.retain(|p| !p.task.is_finished());
            }
            let full = in_progress.load(Ordering::SeqCst) >= limits.max_pending_handshakes
                || slots.available_permits() == 0;
            let evicted = full && evict_oldest(&mut queue);
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(
                        %peer,
                        max_connections = limits.max_connections,
                        "connection limit reached; closing new connections (logged at most every 10 s)"
                    );
                }
                continue;
            };
            if evicted && last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                last_warning = Some(Instant::now());
                tracing::warn!(
                    max_pending_handshakes = limits.max_pending_handshakes,
                    "too many TLS handshakes in progress; dropping the oldest for new ones (logged at most every 10 s)"
                );
            }
            let _ = tcp.set_nodelay(true);
            let slot = Slot::new(permit, &in_progress);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let task_slot = Arc::clone(&slot);
            let task = handshakes.spawn(async move {
                let result =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                // Taken in every case, so a failed handshake frees its slot now.
                let slot = task_slot.take();
                match (result, slot) {
                    (Ok(Ok(inner)), Some(slot)) => {
                        let _ = tx.send(Ok(LimitedTlsStream::new(inner, slot))).await;
                    }
                    // Evicted just as it finished: its slot went to a newcomer.
                    (Ok(Ok(_)), None) => {}
                    (Ok(Err(e)), _) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    (Err(_), _) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            queue.push_back(Pending { slot, task });
        }
    });
    ReceiverStream::new(rx)
}

/// The accepted connections of [`tls_incoming`] as an axum listener (for the
/// OAuth listener's HTTP/1.1 and HTTP/2): each connection's address is its
/// [`PeerConnection`], which handlers read through `ConnectInfo`.
pub(crate) struct TlsListener {
    incoming: ReceiverStream<Result<LimitedTlsStream, io::Error>>,
}

impl TlsListener {
    pub(crate) fn new(incoming: ReceiverStream<Result<LimitedTlsStream, io::Error>>) -> Self {
        Self { incoming }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = LimitedTlsStream;
    type Addr = PeerConnection;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt as _;
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.peer.clone();
                    return (stream, peer);
                }
                // Failed handshakes are logged where they fail.
                Some(Err(_)) => {}
                // The accept loop stopped (shutdown): the server's graceful
                // shutdown ends the serve future; no connection comes.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        // A listener has no peer; axum asks only for logging.
        Ok(PeerConnection::new(Vec::new()))
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for PeerConnection
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
