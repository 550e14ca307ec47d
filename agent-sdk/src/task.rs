//! Tasks: the request, the guard, its credentials and the background renewer.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use leash_proto::v1 as pb;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    Approval, ApprovalOutcome, ApprovalState, Client, Delegation, DelegationRequest, Error,
    LeaseState,
    approval::{Step, TaskEvent, step},
    delegation::proto_duration,
    retry::random_unit,
    trace::TraceParent,
};

/// A renewal is never scheduled later than this before the lease deadline.
pub const RENEWAL_SAFETY_MARGIN: Duration = Duration::from_millis(500);

/// Renewals are never closer together than this (unless a retry needs it), so
/// credentials that live only milliseconds cannot cause a storm of renewals.
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_millis(100);

/// Most RenewLease attempts [`Task::approval`] makes to collect the approved
/// credentials, when the broker answers "too soon" (with a retry-after) or is
/// unavailable.
pub const MAX_APPROVAL_RENEW_ATTEMPTS: u32 = 5;

/// What a task is about to do: a template, its parameters, an intent, a TTL.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    template: String,
    parameters: BTreeMap<String, String>,
    intent: String,
    ttl: Option<Duration>,
    idempotency_key: Option<String>,
    trace: Option<TraceParent>,
}

impl TaskRequest {
    /// A task against the template named `template`.
    pub fn new(template: impl Into<String>) -> Self {
        Self {
            template: template.into(),
            parameters: BTreeMap::new(),
            intent: String::new(),
            ttl: None,
            idempotency_key: None,
            trace: None,
        }
    }

    /// Binds the template parameter `name` to `value`.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.parameters.insert(name.into(), value.into());
        self
    }

    /// What the agent is about to do, in plain words, for the audit trail. Required
    /// by the broker (at most 1024 bytes).
    pub fn intent(mut self, intent: impl Into<String>) -> Self {
        self.intent = intent.into();
        self
    }

    /// The lease TTL wanted; the template's default when not set. Each renewal
    /// extends the lease by the template's TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The idempotency key (at most 128 bytes of printable ASCII). Without one,
    /// the SDK generates a random key per `begin_task` call, which makes that
    /// call's own retries safe; set one to make retries across process restarts
    /// return the same task.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The trace context of this task: its BeginTask, renewals and completion
    /// carry it as `traceparent`. Overrides the client's
    /// ([`ClientBuilder::traceparent`](crate::ClientBuilder::traceparent)).
    pub fn traceparent(mut self, trace: TraceParent) -> Self {
        self.trace = Some(trace);
        self
    }

    pub(crate) fn trace_parent(&self) -> Option<TraceParent> {
        self.trace
    }

    pub(crate) fn into_proto(self) -> pb::BeginTaskRequest {
        pb::BeginTaskRequest {
            template: self.template,
            parameters: self.parameters.into_iter().collect(),
            intent: self.intent,
            requested_ttl: self.ttl.map(proto_duration),
            idempotency_key: self.idempotency_key.unwrap_or_else(random_key),
        }
    }
}

/// `sdk-` and 128 random bits in hex.
fn random_key() -> String {
    let mut b = [0u8; 16];
    let rng = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&rng, &mut b).is_err() {
        // Without randomness, fall back to the clock: still unique per process
        // in practice, and only used to deduplicate this call's retries.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = nanos.to_le_bytes();
    }
    let mut key = String::from("sdk-");
    for byte in b {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// The kind of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialKind {
    /// A JWT signed by the broker; resource servers verify it offline (JWKS).
    Jwt,
    /// An opaque token; resource servers check it with introspection.
    Opaque,
    /// A kind this SDK version does not know.
    Unknown,
}

/// One credential of a task: one grant of the template. `Debug` never shows the
/// value; [`secret`](Credential::secret) does.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    id: String,
    grant: String,
    kind: CredentialKind,
    audience: String,
    scopes: Vec<String>,
    expires_at: SystemTime,
    value: Arc<str>,
}

impl Credential {
    fn from_proto(c: pb::Credential) -> Self {
        let kind = match pb::CredentialKind::try_from(c.kind) {
            Ok(pb::CredentialKind::Jwt) => CredentialKind::Jwt,
            Ok(pb::CredentialKind::Opaque) => CredentialKind::Opaque,
            _ => CredentialKind::Unknown,
        };
        Self {
            id: c.id,
            grant: c.grant,
            kind,
            audience: c.audience,
            scopes: c.scopes,
            expires_at: system_time(c.expires_at),
            value: c.value.into(),
        }
    }

    /// The credential's id (the JWT `jti`); safe to log.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The template grant it was minted for.
    pub fn grant(&self) -> &str {
        &self.grant
    }

    /// JWT or opaque.
    pub fn kind(&self) -> CredentialKind {
        self.kind
    }

    /// The one audience (resource server) it is for.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Its scopes, parameters substituted.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// When it stops being active (never after the lease deadline it was minted for).
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// The secret value to present to the resource server. Never log it.
    pub fn secret(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("id", &self.id)
            .field("grant", &self.grant)
            .field("kind", &self.kind)
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("expires_at", &self.expires_at)
            .field("value", &"...")
            .finish()
    }
}

/// The current credentials of a task (one per grant) and the lease they live in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    generation: u64,
    lease_expires_at: SystemTime,
    max_lifetime_at: SystemTime,
    list: Vec<Credential>,
}

impl Credentials {
    /// The credential of `grant`, if the template has that grant.
    pub fn get(&self, grant: &str) -> Option<&Credential> {
        self.list.iter().find(|c| c.grant == grant)
    }

    /// Every credential, in template order.
    pub fn iter(&self) -> impl Iterator<Item = &Credential> {
        self.list.iter()
    }

    /// 0 for the credentials from BeginTask, then one more per successful renewal.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The lease deadline these credentials were minted for.
    pub fn lease_expires_at(&self) -> SystemTime {
        self.lease_expires_at
    }

    /// No renewal extends the lease past this instant.
    pub fn max_lifetime_at(&self) -> SystemTime {
        self.max_lifetime_at
    }

    /// The earliest expiry among these credentials (the lease deadline if none).
    pub fn earliest_expiry(&self) -> SystemTime {
        self.list
            .iter()
            .map(|c| c.expires_at)
            .min()
            .unwrap_or(self.lease_expires_at)
            .min(self.lease_expires_at)
    }
}

/// The state of a task's lease, as the guard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseStatus {
    /// Renewed in time; ends at `expires_at` unless renewed again.
    Active {
        /// The current lease deadline.
        expires_at: SystemTime,
    },
    /// A renewal was refused, or the deadline passed without a successful renewal.
    /// Stop the work: the credentials are, or are about to be, inactive.
    Lost {
        /// Why, from the broker or the SDK.
        reason: String,
    },
    /// The task was completed through [`Task::complete`].
    Completed,
}

/// How a task ended, as its owner declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The task did what it declared.
    Succeeded,
    /// The task failed.
    Failed,
    /// The task was stopped before it finished.
    Cancelled,
}

impl Outcome {
    fn to_proto(self) -> pb::Outcome {
        match self {
            Self::Succeeded => pb::Outcome::Succeeded,
            Self::Failed => pb::Outcome::Failed,
            Self::Cancelled => pb::Outcome::Cancelled,
        }
    }
}

/// What [`Task::complete`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// False when the lease had already lapsed: the broker recorded the task as
    /// expired (its credentials were revoked at expiry).
    pub completed_in_time: bool,
    /// Credentials revoked by this call (0 when they were already revoked).
    pub revoked_credentials: u32,
}

/// A declared task. While the guard lives, a background renewer extends the lease
/// well before its deadline and publishes the fresh credentials.
///
/// End it with [`complete`](Task::complete). **Dropping the guard without
/// completing** stops the renewer and, when a Tokio runtime is available, spawns a
/// best-effort `CompleteTask` with outcome *cancelled*; if that call cannot be
/// made (no runtime, runtime shutting down, broker unreachable), the credentials
/// still die at the lease deadline because nobody renews it.
pub struct Task {
    id: String,
    replayed: bool,
    actors: Vec<String>,
    client: Client,
    credentials: watch::Receiver<Credentials>,
    shared: Arc<Shared>,
    renewer: Option<JoinHandle<()>>,
    ended: bool,
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("id", &self.id)
            .field("replayed", &self.replayed)
            .field("actors", &self.actors)
            .field("state", &*self.shared.view.borrow())
            .field("status", &*self.shared.status.borrow())
            .field("credentials", &*self.credentials.borrow())
            .finish()
    }
}

/// The broker's view of a task, as last learned: from the begin (or redeem)
/// answer, then from `WatchTask` events and this guard's own calls.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    state: LeaseState,
    approval: Option<Approval>,
}

/// What the guard and its renewer share: the credentials, the guard's lease
/// status, the broker's view, and the lease deadline on the monotonic clock.
/// Every renewal, whoever makes it, goes through [`Shared::renewed`].
#[derive(Debug)]
struct Shared {
    task_id: String,
    credentials: watch::Sender<Credentials>,
    status: watch::Sender<LeaseStatus>,
    view: watch::Sender<View>,
    deadline: Mutex<Instant>,
    // The task's trace context, carried by every call made for it.
    trace: Option<TraceParent>,
}

impl Shared {
    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes a renewal's answer: the new deadline, the fresh credentials
    /// (they replace the set), and an active status.
    fn renewed(&self, received: Instant, response: pb::RenewLeaseResponse) {
        let expires_at = system_time(response.lease_expires_at);
        {
            let mut deadline = self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
            // Two renewals may cross (the renewer's and one after an
            // approval); the later deadline is the one the broker holds.
            *deadline = (*deadline).max(deadline_from(received, expires_at));
        }
        let generation = self.credentials.borrow().generation + 1;
        self.credentials.send_replace(Credentials {
            generation,
            lease_expires_at: expires_at,
            max_lifetime_at: system_time(response.max_lifetime_at),
            list: response
                .credentials
                .into_iter()
                .map(Credential::from_proto)
                .collect(),
        });
        self.status.send_replace(LeaseStatus::Active { expires_at });
        tracing::debug!(task_id = %self.task_id, generation, "lease renewed");
    }

    /// Records what a `WatchTask` event says.
    fn observe(&self, event: &TaskEvent) {
        self.view.send_replace(View {
            state: event.state,
            approval: event.approval.clone(),
        });
    }
}

/// State, approval and delegation chain of a BeginTask or RedeemDelegation
/// answer. A state this SDK does not know reads as active (the broker sends
/// none it does not document); an approval it cannot read is left out, and
/// [`Task::approval`] then learns it from the first `WatchTask` event.
fn begun_view(response: &pb::BeginTaskResponse) -> (View, Vec<String>) {
    (
        View {
            state: LeaseState::from_proto(response.state).unwrap_or(LeaseState::Active),
            approval: response
                .approval
                .clone()
                .and_then(|a| Approval::from_proto(a).ok()),
        },
        response.actors.clone(),
    )
}

impl Task {
    /// The guard for a task the broker just began (BeginTask) or handed over
    /// (RedeemDelegation; its answer is a `BeginTaskResponse` too): the one
    /// path from that answer to a renewing guard. `received` is when the answer
    /// arrived, for the monotonic deadline.
    ///
    /// # Errors
    /// [`Error::Transport`] when the answer has no task id.
    pub(crate) fn from_response(
        client: Client,
        received: Instant,
        response: pb::BeginTaskResponse,
        trace: Option<TraceParent>,
    ) -> Result<Self, Error> {
        let lease_expires_at = system_time(response.lease_expires_at);
        if response.task_id.is_empty() {
            return Err(Error::Transport(
                "the broker answered without a task id".into(),
            ));
        }
        let (view, actors) = begun_view(&response);
        let credentials = Credentials {
            generation: 0,
            lease_expires_at,
            max_lifetime_at: system_time(response.max_lifetime_at),
            list: response
                .credentials
                .into_iter()
                .map(Credential::from_proto)
                .collect(),
        };
        let (creds_tx, creds_rx) = watch::channel(credentials);
        let shared = Arc::new(Shared {
            task_id: response.task_id.clone(),
            credentials: creds_tx,
            status: watch::channel(LeaseStatus::Active {
                expires_at: lease_expires_at,
            })
            .0,
            view: watch::channel(view).0,
            deadline: Mutex::new(deadline_from(received, lease_expires_at)),
            trace,
        });
        let renewer = Renewer {
            client: client.clone(),
            shared: Arc::clone(&shared),
        };
        let handle = tokio::spawn(renewer.run());
        Ok(Self {
            id: response.task_id,
            replayed: response.replayed,
            actors,
            client,
            credentials: creds_rx,
            shared,
            renewer: Some(handle),
            ended: false,
        })
    }

    /// The trace context this task's calls carry, if any: what
    /// `leash-agent exec` hands its child as `TRACEPARENT`.
    pub fn trace_parent(&self) -> Option<TraceParent> {
        self.shared.trace
    }

    /// The task id (safe to log).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// True when BeginTask replayed an earlier call with the same idempotency key.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// The current credential of `grant`; `None` if the template has no such grant.
    pub fn credential(&self, grant: &str) -> Option<Credential> {
        self.credentials.borrow().get(grant).cloned()
    }

    /// A snapshot of all current credentials.
    pub fn credentials(&self) -> Credentials {
        self.credentials.borrow().clone()
    }

    /// A receiver that sees every renewal's fresh credentials.
    pub fn watch(&self) -> watch::Receiver<Credentials> {
        self.credentials.clone()
    }

    /// A receiver of the lease status; it changes on every renewal and when the
    /// lease is lost.
    pub fn status(&self) -> watch::Receiver<LeaseStatus> {
        self.shared.status.subscribe()
    }

    /// The task's lease state as the broker last reported it: at begin (or
    /// redeem), then at every `WatchTask` event [`approval`](Self::approval)
    /// receives, and [`LeaseState::Active`] after an approval was used. It does
    /// not poll the broker; for the guard's own view of its renewals see
    /// [`status`](Self::status).
    pub fn state(&self) -> LeaseState {
        self.shared.view.borrow().state
    }

    /// Where the task's approval stands, as last learned (see
    /// [`state`](Self::state)); [`ApprovalState::NotRequired`] while nothing
    /// says otherwise.
    pub fn approval_state(&self) -> ApprovalState {
        self.shared
            .view
            .borrow()
            .approval
            .as_ref()
            .map_or(ApprovalState::NotRequired, |a| a.state)
    }

    /// The task's approval (gated grants, deadline, decision), as last learned;
    /// `None` while no approval is known.
    pub fn approval_details(&self) -> Option<Approval> {
        self.shared.view.borrow().approval.clone()
    }

    /// The delegation chain from the begin (or redeem) answer, current actor
    /// first: empty for a task begun directly.
    pub fn actors(&self) -> &[String] {
        &self.actors
    }

    /// Hands a narrower task to a subagent (DelegateTask with this task as the
    /// parent). No credential is issued here: give the returned [`Delegation`]
    /// (e.g. [`Delegation::to_token`] in the subagent's environment) to the
    /// subagent, which calls [`Client::redeem_delegation`] over its own SVID.
    /// The child dies with this task. `UNAVAILABLE` is retried per the retry
    /// policy; a child made by an attempt whose answer was lost is never
    /// redeemed and expires at its lease deadline.
    ///
    /// # Errors
    /// [`Error::Invalid`] before any call for a request that cannot be right
    /// (see [`DelegationRequest`]), or from the broker naming the field;
    /// [`Error::Denied`] (a scope the parent does not hold, not this task's
    /// owner, depth exhausted); [`Error::Precondition`] (this task ended);
    /// [`Error::NotFound`]; [`Error::Unavailable`] after the retries;
    /// [`Error::Transport`].
    pub async fn delegate(&self, request: DelegationRequest) -> Result<Delegation, Error> {
        let request = request.into_proto(&self.id)?;
        let response = self
            .client
            .delegate(request, self.shared.trace.as_ref())
            .await?;
        Delegation::from_proto(response)
    }

    /// Waits until the task's approval is decided, and collects the approved
    /// credentials.
    ///
    /// It watches the task (`WatchTask`): a task that needs no approval returns
    /// [`ApprovalOutcome::NotRequired`] at once. On approval it renews the lease
    /// at once (honouring the broker's retry-after when renewed too soon, at
    /// most [`MAX_APPROVAL_RENEW_ATTEMPTS`] times) so the gated grants'
    /// credentials are in [`credentials`](Self::credentials) and
    /// [`watch`](Self::watch) when it returns. The background renewer keeps
    /// the lease meanwhile. A broken watch stream is reopened with the client's
    /// retry policy (backoff between attempts; the attempts are counted from
    /// the last event received).
    ///
    /// # Errors
    /// [`Error::ApprovalDenied`] (who and why), [`Error::ApprovalExpired`];
    /// [`Error::LeaseLost`] when the task ends or its lease is lost first;
    /// [`Error::Unavailable`] or [`Error::Transport`] when the watch could not
    /// be kept open; the renewal's error when the approved credentials could
    /// not be collected.
    pub async fn approval(&self) -> Result<ApprovalOutcome, Error> {
        let lost = self.lease_lost();
        tokio::pin!(lost);
        let policy = self.client.retry_policy();
        let mut failures = 0u32;
        loop {
            let error = tokio::select! {
                e = &mut lost => return Err(e),
                r = self.watch_until_decided(&mut failures) => match r {
                    Ok(step) => return self.settle(step).await,
                    Err(e) => e,
                },
            };
            failures += 1;
            if failures >= policy.max_attempts.max(1) {
                return Err(error);
            }
            let wait = policy.backoff(failures);
            tracing::debug!(task_id = %self.id, %error, ?wait, "task watch broke; reopening");
            tokio::select! {
                e = &mut lost => return Err(e),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Opens one `WatchTask` stream and reads it until an event decides the
    /// wait; returns the error that broke it otherwise (a clean end of the
    /// stream before the task ended counts as broken). Non-retryable errors are
    /// returned as the final [`Step::Fail`].
    async fn watch_until_decided(&self, failures: &mut u32) -> Result<Step, Error> {
        let mut stream = match self
            .client
            .watch_task(&self.id, self.shared.trace.as_ref())
            .await
        {
            Ok(s) => s,
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => return Ok(Step::Fail(e)),
        };
        loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    *failures = 0;
                    let event = match TaskEvent::from_proto(event, &self.id) {
                        Ok(e) => e,
                        Err(e) => return Ok(Step::Fail(e)),
                    };
                    self.shared.observe(&event);
                    match step(&event) {
                        Step::Wait => continue,
                        decided => return Ok(decided),
                    }
                }
                Ok(None) => {
                    return Err(Error::Unavailable(
                        "the task watch ended before the approval was decided".into(),
                    ));
                }
                Err(status) => match Error::from(status) {
                    // A stream cut mid-way (reset, idle timeout) is worth
                    // reopening: watching changes nothing.
                    e @ (Error::Unavailable(_) | Error::Transport(_)) => return Err(e),
                    e => return Ok(Step::Fail(e)),
                },
            }
        }
    }

    /// Turns the deciding step into the answer, renewing after an approval.
    async fn settle(&self, step: Step) -> Result<ApprovalOutcome, Error> {
        match step {
            Step::Wait | Step::NotRequired => Ok(ApprovalOutcome::NotRequired),
            Step::Fail(e) => Err(e),
            Step::Approved { by, reason, grants } => {
                if !self.holds_all(&grants) {
                    self.renew_for_approval(&grants).await?;
                }
                if !self.holds_all(&grants) {
                    tracing::warn!(task_id = %self.id, ?grants, "approved, but the renewal did not carry every gated grant");
                }
                self.shared.view.send_modify(|v| {
                    v.state = LeaseState::Active;
                    if let Some(a) = &mut v.approval {
                        a.state = ApprovalState::Redeemed;
                    }
                });
                Ok(ApprovalOutcome::Approved { by, reason })
            }
        }
    }

    /// True when the current credentials include one of every grant named.
    fn holds_all(&self, grants: &[String]) -> bool {
        let current = self.credentials.borrow();
        grants.iter().all(|g| current.get(g).is_some())
    }

    /// RenewLease now, to collect approved credentials: retried after the
    /// broker's retry-after when renewed too soon, and with backoff when it is
    /// unavailable, at most [`MAX_APPROVAL_RENEW_ATTEMPTS`] attempts in all.
    /// If a failed attempt crossed a renewal by the background renewer that
    /// brought the grants, that counts as success.
    async fn renew_for_approval(&self, grants: &[String]) -> Result<(), Error> {
        let policy = self.client.retry_policy();
        let mut attempt = 1;
        loop {
            let error = match self
                .client
                .renew_once(&self.id, self.shared.trace.as_ref())
                .await
            {
                Ok(response) => {
                    self.shared.renewed(Instant::now(), response);
                    return Ok(());
                }
                Err(e) => e,
            };
            if self.holds_all(grants) {
                return Ok(());
            }
            let wait = match &error {
                Error::Exhausted {
                    retry_after: Some(d),
                    ..
                } => *d,
                Error::Unavailable(_) => policy.backoff(attempt),
                _ => return Err(error),
            };
            if attempt >= MAX_APPROVAL_RENEW_ATTEMPTS {
                return Err(error);
            }
            tracing::debug!(task_id = %self.id, %error, ?wait, attempt, "renewal after approval; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Resolves when the lease is lost, with [`Error::LeaseLost`] saying why; never
    /// resolves while the lease is kept. Use it in `tokio::select!` beside the work.
    pub async fn lease_lost(&self) -> Error {
        let mut rx = self.shared.status.subscribe();
        loop {
            if let LeaseStatus::Lost { reason } = &*rx.borrow_and_update() {
                return Error::LeaseLost(reason.clone());
            }
            if rx.changed().await.is_err() {
                // Unreachable while `self` holds the sender; wait forever to be safe.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Ends the task: stops the renewer, then calls CompleteTask (retried on
    /// `UNAVAILABLE`; it is idempotent). When it returns `Ok`, every credential of
    /// the task is inactive at the broker.
    ///
    /// # Errors
    /// [`Error::Unavailable`] after the retries, [`Error::Transport`],
    /// [`Error::Invalid`] (summary longer than 1024 bytes), [`Error::Denied`].
    /// The renewer is stopped in every case, so on error the credentials die at
    /// the lease deadline.
    pub async fn complete(
        mut self,
        outcome: Outcome,
        summary: impl Into<String>,
    ) -> Result<Completion, Error> {
        self.ended = true;
        self.stop_renewer().await;
        let response = self
            .client
            .complete(
                pb::CompleteTaskRequest {
                    task_id: self.id.clone(),
                    outcome: outcome.to_proto().into(),
                    summary: summary.into(),
                },
                self.shared.trace.as_ref(),
            )
            .await?;
        self.shared.status.send_replace(LeaseStatus::Completed);
        let state = LeaseState::from_proto(response.state).unwrap_or(LeaseState::Completed);
        self.shared.view.send_modify(|v| v.state = state);
        Ok(Completion {
            completed_in_time: response.state != i32::from(pb::LeaseState::Expired),
            revoked_credentials: response.revoked_credentials,
        })
    }

    async fn stop_renewer(&mut self) {
        if let Some(handle) = self.renewer.take() {
            handle.abort();
            // A cancelled JoinError is the expected result.
            let _ = handle.await;
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(handle) = self.renewer.take() {
            handle.abort();
        }
        if self.ended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(task_id = %self.id, "task guard dropped outside a Tokio runtime; its lease will expire");
            return;
        };
        let client = self.client.clone();
        let task_id = self.id.clone();
        let trace = self.shared.trace;
        runtime.spawn(async move {
            let result = client
                .complete(
                    pb::CompleteTaskRequest {
                        task_id: task_id.clone(),
                        outcome: pb::Outcome::Cancelled.into(),
                        summary: "task guard dropped without completion".into(),
                    },
                    trace.as_ref(),
                )
                .await;
            match result {
                Ok(_) => tracing::debug!(%task_id, "dropped task completed as cancelled"),
                Err(e) => {
                    tracing::warn!(%task_id, error = %e, "could not complete dropped task; its lease will expire")
                }
            }
        });
    }
}

/// Renews one task's lease until aborted or the lease is lost.
struct Renewer {
    client: Client,
    shared: Arc<Shared>,
}

impl Renewer {
    async fn run(mut self) {
        let reason = self.keep().await;
        tracing::warn!(task_id = %self.shared.task_id, %reason, "lease lost");
        self.shared
            .status
            .send_replace(LeaseStatus::Lost { reason });
    }

    /// Renews until it cannot; returns why.
    async fn keep(&mut self) -> String {
        loop {
            let now = Instant::now();
            let lease_left = self.shared.deadline().saturating_duration_since(now);
            // Credentials may die before the lease (a grant TTL shorter than the
            // lease, or a JWT `exp` rounded down to whole seconds): renew for
            // whichever ends first, so the current credentials stay usable.
            let credentials_left =
                deadline_from(now, self.shared.credentials.borrow().earliest_expiry())
                    .saturating_duration_since(now);
            let wait = renewal_delay(lease_left.min(credentials_left))
                .max(MIN_RENEWAL_INTERVAL)
                .min(lease_left);
            tokio::time::sleep(wait).await;
            if let Err(reason) = self.renew().await {
                return reason;
            }
        }
    }

    /// One renewal, retried on `UNAVAILABLE`, `RESOURCE_EXHAUSTED` (too soon;
    /// after the broker's retry-after when it gives one) and on timeouts until
    /// the deadline:
    /// repeating a renewal is harmless (it extends the same lease), and giving up
    /// early would end the task for a passing network problem.
    async fn renew(&mut self) -> Result<(), String> {
        let policy = self.client.retry_policy();
        let mut failures = 0u32;
        loop {
            let now = Instant::now();
            let deadline = self.shared.deadline();
            let Some(left) = deadline
                .checked_duration_since(now)
                .filter(|d| !d.is_zero())
            else {
                return Err("the lease deadline passed without a successful renewal".into());
            };
            let attempt = tokio::time::timeout(
                left,
                self.client
                    .renew_once(&self.shared.task_id, self.shared.trace.as_ref()),
            )
            .await;
            let error = match attempt {
                Ok(Ok(response)) => {
                    self.shared.renewed(Instant::now(), response);
                    return Ok(());
                }
                // Exhausted: renewed sooner than the template allows (only after
                // a retried renewal); waiting a backoff step and retrying is right.
                Ok(Err(
                    e @ (Error::Unavailable(_) | Error::Transport(_) | Error::Exhausted { .. }),
                )) => e,
                Ok(Err(e)) => return Err(format!("renewal refused: {e}")),
                Err(_) => Error::Transport("renewal timed out at the lease deadline".into()),
            };
            failures += 1;
            let wait = error
                .retry_after()
                .unwrap_or_else(|| policy.backoff(failures))
                .min(
                    self.shared
                        .deadline()
                        .saturating_duration_since(Instant::now()),
                );
            let task_id = &self.shared.task_id;
            if matches!(error, Error::Exhausted { .. }) {
                // Expected when a credential expires well before the lease (a
                // JWT `exp` is rounded down to a second): not worth a warning.
                tracing::debug!(%task_id, %error, ?wait, "renewal too soon; retrying");
            } else {
                tracing::warn!(%task_id, %error, ?wait, "renewal failed; retrying");
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// When to renew with `remaining` left (of the lease or of the earliest
/// credential, whichever is less): at a random point between 1/2 and 2/3 of it (so agents that began together do not renew together), and never
/// later than [`RENEWAL_SAFETY_MARGIN`] before the deadline.
pub(crate) fn renewal_delay(remaining: Duration) -> Duration {
    let share = 0.5 + random_unit() / 6.0;
    remaining
        .mul_f64(share)
        .min(remaining.saturating_sub(RENEWAL_SAFETY_MARGIN))
}

/// The monotonic instant of a wall-clock deadline, measured from `received`.
/// The broker's and this host's clocks are assumed synchronised (NTP).
fn deadline_from(received: Instant, expires_at: SystemTime) -> Instant {
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    received + left
}

/// A wire timestamp as a `SystemTime`; the epoch when absent or negative.
pub(crate) fn system_time(ts: Option<prost_types::Timestamp>) -> SystemTime {
    let Some(ts) = ts else {
        return UNIX_EPOCH;
    };
    let secs = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u32::try_from(ts.nanos).unwrap_or(0);
    UNIX_EPOCH + Duration::new(secs, 0) + Duration::from_nanos(u64::from(nanos))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::*;

    #[test]
    fn renewal_happens_between_half_and_two_thirds_and_before_the_margin() {
        for _ in 0..500 {
            let d = renewal_delay(Duration::from_secs(60));
            assert!(
                d >= Duration::from_secs(30) && d <= Duration::from_secs(40),
                "{d:?}"
            );
            let d = renewal_delay(Duration::from_secs(1));
            assert!(
                d >= Duration::from_millis(400) && d <= Duration::from_millis(500),
                "{d:?}"
            );
            assert_eq!(renewal_delay(Duration::from_millis(300)), Duration::ZERO);
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credential::from_proto(pb::Credential {
            id: "cred-1".into(),
            grant: "github".into(),
            kind: pb::CredentialKind::Jwt.into(),
            audience: "https://api".into(),
            scopes: vec!["repo:read".into()],
            value: "super-secret-value".into(),
            expires_at: None,
        });
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("super-secret-value"), "{shown}");
        assert!(shown.contains("cred-1"));
        assert_eq!(c.secret(), "super-secret-value");
        let creds = Credentials {
            generation: 0,
            lease_expires_at: UNIX_EPOCH,
            max_lifetime_at: UNIX_EPOCH,
            list: vec![c],
        };
        assert!(!format!("{creds:?}").contains("super-secret-value"));
    }

    #[test]
    fn a_key_is_generated_per_request_unless_given() {
        let a = TaskRequest::new("t").into_proto().idempotency_key;
        let b = TaskRequest::new("t").into_proto().idempotency_key;
        assert_ne!(a, b);
        assert!(a.len() <= 128 && a.chars().all(|c| c.is_ascii_graphic()));
        let given = TaskRequest::new("t")
            .idempotency_key("mine")
            .into_proto()
            .idempotency_key;
        assert_eq!(given, "mine");
        let ttl = TaskRequest::new("t")
            .ttl(Duration::from_millis(1500))
            .into_proto()
            .requested_ttl
            .unwrap();
        assert_eq!((ttl.seconds, ttl.nanos), (1, 500_000_000));
    }
}
