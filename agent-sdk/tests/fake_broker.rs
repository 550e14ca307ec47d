//! `Task::approval`, `Task::delegate` and `Client::redeem_delegation` against a
//! scripted stand-in broker over real TLS.
//!
//! The real broker does not serve DelegateTask, RedeemDelegation and WatchTask
//! yet (they answer UNIMPLEMENTED), so these tests pin the SDK's side of the
//! contract: what it sends, how it reads each answer, how it retries. The
//! end-to-end tests against the real broker come when it implements them.
#![expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use leash_e2e::TestPki;
use leash_proto::v1::{self as pb, broker_server::Broker, broker_server::BrokerServer};
use leash_sdk::{
    ApprovalOutcome, ApprovalState, Client, Delegation, DelegationRequest, Error, LeaseState,
    Outcome, RetryPolicy, Task, TaskRequest,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{
    Code, Request, Response, Status,
    transport::{Identity, Server, ServerTlsConfig},
};
use tonic_types::{ErrorDetails, StatusExt as _};

const HANDLE: &str = "lsdh_fake-handle-secret";
const ALICE: &str = "spiffe://acme.test/human/alice";

/// One step of a scripted WatchTask stream. After the last step the stream
/// stays open (as a real one does while the task lives), unless it was `End`.
#[derive(Clone)]
enum Step {
    Event(pb::TaskEvent),
    Wait(Duration),
    /// From now on, renewals carry the gated `deploy` grant.
    Approve,
    Fail(Status),
    End,
}

struct Fake {
    lease_ttl: Duration,
    watches: Mutex<VecDeque<Vec<Step>>>,
    /// What a WatchTask gets when no script is left.
    watch_default: Vec<Step>,
    approved: AtomicBool,
    /// Renewals after the approval that are answered "too soon" first.
    too_soon: AtomicU32,
    watch_calls: AtomicU32,
    renew_calls: AtomicU32,
    complete_calls: AtomicU32,
    delegations: Mutex<Vec<pb::DelegateTaskRequest>>,
    redeemed: AtomicBool,
}

impl Fake {
    fn new(lease_ttl: Duration, watches: Vec<Vec<Step>>) -> Self {
        Self {
            lease_ttl,
            watches: Mutex::new(watches.into()),
            watch_default: vec![Step::Fail(Status::unavailable("no more scripts"))],
            approved: AtomicBool::new(false),
            too_soon: AtomicU32::new(0),
            watch_calls: AtomicU32::new(0),
            renew_calls: AtomicU32::new(0),
            complete_calls: AtomicU32::new(0),
            delegations: Mutex::new(Vec::new()),
            redeemed: AtomicBool::new(false),
        }
    }

    fn deadline(&self) -> Option<prost_types::Timestamp> {
        Some(timestamp(SystemTime::now() + self.lease_ttl))
    }

    fn credentials(&self, task_id: &str) -> Vec<pb::Credential> {
        let mut grants = vec!["github"];
        if self.approved.load(Ordering::SeqCst) {
            grants.push("deploy");
        }
        let n = self.renew_calls.load(Ordering::SeqCst);
        grants
            .into_iter()
            .map(|g| pb::Credential {
                id: format!("{task_id}-{g}-{n}"),
                grant: g.into(),
                kind: pb::CredentialKind::Opaque.into(),
                audience: format!("https://{g}.test"),
                scopes: vec![format!("{g}:use")],
                value: format!("lsh_{g}_{n}"),
                expires_at: Some(timestamp(SystemTime::now() + Duration::from_secs(3600))),
            })
            .collect()
    }

    fn begun(&self, task_id: &str) -> pb::BeginTaskResponse {
        pb::BeginTaskResponse {
            task_id: task_id.into(),
            lease_expires_at: self.deadline(),
            max_lifetime_at: Some(timestamp(SystemTime::now() + Duration::from_secs(600))),
            credentials: self.credentials(task_id),
            replayed: false,
        }
    }
}

/// The service: a handle on the shared fake (the tests read its counters).
struct Svc(Arc<Fake>);

impl std::ops::Deref for Svc {
    type Target = Fake;
    fn deref(&self) -> &Fake {
        &self.0
    }
}

#[tonic::async_trait]
impl Broker for Svc {
    async fn begin_task(
        &self,
        _: Request<pb::BeginTaskRequest>,
    ) -> Result<Response<pb::BeginTaskResponse>, Status> {
        Ok(Response::new(self.begun("t-1")))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        if self.approved.load(Ordering::SeqCst)
            && self
                .too_soon
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(Status::with_error_details(
                Code::ResourceExhausted,
                "renewed sooner than the template's min_renew_interval",
                ErrorDetails::with_retry_info(Some(Duration::from_millis(200))),
            ));
        }
        self.renew_calls.fetch_add(1, Ordering::SeqCst);
        let task_id = request.into_inner().task_id;
        Ok(Response::new(pb::RenewLeaseResponse {
            lease_expires_at: self.deadline(),
            max_lifetime_at: Some(timestamp(SystemTime::now() + Duration::from_secs(600))),
            credentials: self.credentials(&task_id),
            task_id,
        }))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        self.complete_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(pb::CompleteTaskResponse {
            task_id: request.into_inner().task_id,
            state: pb::LeaseState::Completed.into(),
            revoked_credentials: 1,
            revoked_descendants: 0,
        }))
    }

    async fn delegate_task(
        &self,
        request: Request<pb::DelegateTaskRequest>,
    ) -> Result<Response<pb::DelegateTaskResponse>, Status> {
        let request = request.into_inner();
        self.delegations.lock().unwrap().push(request.clone());
        Ok(Response::new(pb::DelegateTaskResponse {
            task_id: "t-child".into(),
            delegation_handle: HANDLE.into(),
            lease_expires_at: self.deadline(),
            max_lifetime_at: Some(timestamp(SystemTime::now() + Duration::from_secs(300))),
            depth: 1,
            grants: request.grants,
        }))
    }

    async fn redeem_delegation(
        &self,
        request: Request<pb::RedeemDelegationRequest>,
    ) -> Result<Response<pb::BeginTaskResponse>, Status> {
        let request = request.into_inner();
        if request.task_id != "t-child" || request.delegation_handle != HANDLE {
            return Err(Status::permission_denied("wrong delegation handle"));
        }
        if self.redeemed.swap(true, Ordering::SeqCst) {
            return Err(Status::permission_denied("delegation already redeemed"));
        }
        Ok(Response::new(self.begun("t-child")))
    }

    type WatchTaskStream = ReceiverStream<Result<pb::TaskEvent, Status>>;

    async fn watch_task(
        &self,
        _: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        self.watch_calls.fetch_add(1, Ordering::SeqCst);
        let script = self
            .watches
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.watch_default.clone());
        let (tx, rx) = mpsc::channel(8);
        let fake = Arc::clone(&self.0);
        tokio::spawn(async move {
            for step in script {
                match step {
                    Step::Event(e) => {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Step::Wait(d) => tokio::time::sleep(d).await,
                    Step::Approve => fake.approved.store(true, Ordering::SeqCst),
                    Step::Fail(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    Step::End => return,
                }
            }
            // Open until the client goes away.
            tx.closed().await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap(),
        nanos: i32::try_from(d.subsec_nanos()).unwrap(),
    }
}

fn event(state: pb::LeaseState, approval: Option<pb::ApprovalState>) -> Step {
    let decided = matches!(
        approval,
        Some(pb::ApprovalState::Approved | pb::ApprovalState::Denied | pb::ApprovalState::Redeemed)
    );
    Step::Event(pb::TaskEvent {
        task_id: "t-1".into(),
        state: state.into(),
        approval: approval.map(|a| pb::Approval {
            state: a.into(),
            grants: vec!["deploy".into()],
            expires_at: Some(timestamp(SystemTime::now() + Duration::from_secs(60))),
            decided_by: if decided { ALICE.into() } else { String::new() },
            reason: if decided {
                "change 7".into()
            } else {
                String::new()
            },
            decided_at: decided.then(|| timestamp(SystemTime::now())),
        }),
        lease_expires_at: None,
    })
}

fn pending() -> Step {
    event(
        pb::LeaseState::PendingApproval,
        Some(pb::ApprovalState::Pending),
    )
}

/// A fake broker on a free port, and a client of it.
async fn start(fake: Fake) -> (Arc<Fake>, Client, TestPki) {
    start_with(fake, leash_sdk::DEFAULT_REQUEST_TIMEOUT).await
}

/// [`start`], with the client's per-call timeout.
async fn start_with(fake: Fake, request_timeout: Duration) -> (Arc<Fake>, Client, TestPki) {
    let pki = TestPki::new();
    let dir = pki.dir.path();
    let identity = Identity::from_pem(
        std::fs::read(dir.join("broker.pem")).unwrap(),
        std::fs::read(dir.join("broker-key.pem")).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = Arc::new(fake);
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .unwrap()
        .add_service(BrokerServer::new(Svc(Arc::clone(&fake))));
    tokio::spawn(server.serve_with_incoming(TcpListenerStream::new(listener)));
    let svid = pki.svid("agent/fake");
    let client = Client::builder()
        .broker(format!("https://localhost:{port}"))
        .svid_files(&svid.cert, &svid.key)
        .bundle_file(pki.bundle())
        .request_timeout(request_timeout)
        .retry(RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(20),
            max: Duration::from_millis(50),
        })
        .connect()
        .await
        .unwrap();
    (fake, client, pki)
}

async fn begin(client: &Client) -> Task {
    client
        .begin_task(TaskRequest::new("deploy").intent("deploy change 7"))
        .await
        .unwrap()
}

async fn approval(task: &Task) -> Result<ApprovalOutcome, Error> {
    tokio::time::timeout(Duration::from_secs(10), task.approval())
        .await
        .expect("approval() did not return")
}

#[tokio::test]
async fn no_approval_needed_returns_at_once() {
    let (fake, client, _pki) = start(Fake::new(
        Duration::from_secs(30),
        vec![vec![event(pb::LeaseState::Active, None)]],
    ))
    .await;
    let task = begin(&client).await;
    assert_eq!(approval(&task).await, Ok(ApprovalOutcome::NotRequired));
    assert_eq!(task.state(), LeaseState::Active);
    assert_eq!(task.approval_state(), ApprovalState::NotRequired);
    assert_eq!(fake.renew_calls.load(Ordering::SeqCst), 0);
    task.complete(Outcome::Succeeded, "done").await.unwrap();
}

#[tokio::test]
async fn approved_renews_at_once_honouring_the_retry_after() {
    let fake = Fake::new(
        Duration::from_secs(30),
        vec![vec![
            pending(),
            Step::Wait(Duration::from_millis(100)),
            Step::Approve,
            event(pb::LeaseState::Active, Some(pb::ApprovalState::Approved)),
        ]],
    );
    fake.too_soon.store(1, Ordering::SeqCst);
    let (fake, client, _pki) = start(fake).await;
    let task = begin(&client).await;
    assert!(task.credential("deploy").is_none(), "gated until approved");
    let updates = task.watch();
    let started = Instant::now();
    let outcome = approval(&task).await;
    assert_eq!(
        outcome,
        Ok(ApprovalOutcome::Approved {
            by: ALICE.into(),
            reason: "change 7".into()
        })
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the 200 ms retry-after was not waited"
    );
    assert_eq!(fake.too_soon.load(Ordering::SeqCst), 0, "too soon was seen");
    assert_eq!(fake.renew_calls.load(Ordering::SeqCst), 1);
    assert!(
        task.credential("deploy").is_some(),
        "{:?}",
        task.credentials()
    );
    assert!(updates.has_changed().unwrap(), "watch() saw the renewal");
    assert_eq!(task.state(), LeaseState::Active);
    assert_eq!(task.approval_state(), ApprovalState::Redeemed);
    let details = task.approval_details().unwrap();
    assert_eq!(details.grants, ["deploy"]);
    assert_eq!(details.decided_by.as_deref(), Some(ALICE));
}

/// Also: the per-call timeout (300 ms here) bounds the wait for the stream's
/// headers, not the life of the stream.
#[tokio::test]
async fn the_renewer_keeps_a_pending_task_alive() {
    let (fake, client, _pki) = start_with(
        Fake::new(
            Duration::from_secs(1),
            vec![vec![
                pending(),
                Step::Wait(Duration::from_millis(1500)),
                Step::Approve,
                event(pb::LeaseState::Active, Some(pb::ApprovalState::Approved)),
            ]],
        ),
        Duration::from_millis(300),
    )
    .await;
    let task = begin(&client).await;
    let outcome = approval(&task).await;
    assert!(
        matches!(outcome, Ok(ApprovalOutcome::Approved { .. })),
        "{outcome:?}"
    );
    assert_eq!(
        fake.watch_calls.load(Ordering::SeqCst),
        1,
        "one stream throughout"
    );
    // At least one renewal while pending, then the one after approval.
    assert!(fake.renew_calls.load(Ordering::SeqCst) >= 2);
    assert!(task.credentials().generation() >= 2);
    assert!(task.credential("deploy").is_some());
}

#[tokio::test]
async fn denied_and_expired_are_errors() {
    let (_fake, client, _pki) = start(Fake::new(
        Duration::from_secs(30),
        vec![
            vec![
                pending(),
                event(
                    pb::LeaseState::PendingApproval,
                    Some(pb::ApprovalState::Denied),
                ),
            ],
            vec![event(
                pb::LeaseState::PendingApproval,
                Some(pb::ApprovalState::Expired),
            )],
        ],
    ))
    .await;
    let task = begin(&client).await;
    assert_eq!(
        approval(&task).await,
        Err(Error::ApprovalDenied {
            by: ALICE.into(),
            reason: "change 7".into()
        })
    );
    assert_eq!(task.approval_state(), ApprovalState::Denied);
    assert_eq!(approval(&task).await, Err(Error::ApprovalExpired));
    assert!(task.credential("deploy").is_none());
    assert_eq!(task.state(), LeaseState::PendingApproval);
}

#[tokio::test]
async fn an_ended_task_ends_the_wait_with_lease_lost() {
    let (_fake, client, _pki) = start(Fake::new(
        Duration::from_secs(30),
        vec![vec![
            pending(),
            event(pb::LeaseState::Revoked, Some(pb::ApprovalState::Pending)),
        ]],
    ))
    .await;
    let task = begin(&client).await;
    let e = approval(&task).await;
    assert!(
        matches!(e, Err(Error::LeaseLost(ref m)) if m.contains("revoked")),
        "{e:?}"
    );
    assert_eq!(task.state(), LeaseState::Revoked);
}

#[tokio::test]
async fn a_broken_watch_is_reopened() {
    let (fake, client, _pki) = start(Fake::new(
        Duration::from_secs(30),
        vec![
            vec![pending(), Step::Fail(Status::unavailable("store down"))],
            vec![pending(), Step::End],
            vec![
                pending(),
                Step::Approve,
                event(pb::LeaseState::Active, Some(pb::ApprovalState::Approved)),
            ],
        ],
    ))
    .await;
    let task = begin(&client).await;
    let outcome = approval(&task).await;
    assert!(
        matches!(outcome, Ok(ApprovalOutcome::Approved { .. })),
        "{outcome:?}"
    );
    assert_eq!(fake.watch_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_watch_that_keeps_breaking_gives_up_after_the_retry_policy() {
    let (fake, client, _pki) = start(Fake::new(Duration::from_secs(30), vec![])).await;
    let task = begin(&client).await;
    let e = approval(&task).await;
    assert!(matches!(e, Err(Error::Unavailable(_))), "{e:?}");
    assert_eq!(
        fake.watch_calls.load(Ordering::SeqCst),
        3,
        "max_attempts of the policy"
    );
}

#[tokio::test]
async fn a_refused_watch_is_not_retried() {
    let (fake, client, _pki) = start(Fake::new(
        Duration::from_secs(30),
        vec![vec![Step::Fail(Status::permission_denied("not the owner"))]],
    ))
    .await;
    let task = begin(&client).await;
    let e = approval(&task).await;
    assert!(matches!(e, Err(Error::Denied(_))), "{e:?}");
    assert_eq!(fake.watch_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn delegate_then_redeem_over_a_token() {
    let (fake, client, _pki) = start(Fake::new(Duration::from_secs(30), vec![])).await;
    let parent = begin(&client).await;
    let delegation = parent
        .delegate(
            DelegationRequest::new("spiffe://acme.test/agent/sub")
                .grant("github", ["github:use"])
                .ttl(Duration::from_secs(60))
                .intent("summarise"),
        )
        .await
        .unwrap();
    let sent = fake.delegations.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].parent_task_id, "t-1");
    assert_eq!(sent[0].subagent, "spiffe://acme.test/agent/sub");
    assert_eq!(sent[0].intent, "summarise");
    assert_eq!(sent[0].grants[0].grant, "github");
    assert_eq!(delegation.task_id(), "t-child");
    assert_eq!(delegation.depth(), 1);
    assert_eq!(delegation.grants()[0].scopes, ["github:use"]);
    assert!(!format!("{delegation:?}").contains(HANDLE));

    // A local refusal makes no call.
    let e = parent
        .delegate(DelegationRequest::new("").intent("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Invalid(ref m) if m.contains("subagent")),
        "{e}"
    );
    assert_eq!(fake.delegations.lock().unwrap().len(), 1);

    let token = delegation.to_token();
    let child = client
        .redeem_delegation(&Delegation::from_token(&token).unwrap())
        .await
        .unwrap();
    assert_eq!(child.id(), "t-child");
    assert!(child.credential("github").is_some());
    assert!(child.actors().is_empty(), "the proto carries no actors yet");
    let again = client.redeem_delegation(&delegation).await;
    assert!(matches!(again, Err(Error::Denied(_))), "{again:?}");
    child
        .complete(Outcome::Succeeded, "summarised")
        .await
        .unwrap();
    assert_eq!(fake.complete_calls.load(Ordering::SeqCst), 1);
}
