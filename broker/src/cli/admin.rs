//! `leash admin ...`: the operator's client of the Admin service — inventory
//! (templates, tasks), approvals, kill switches.
//!
//! Every command connects like the other client commands (flags, then
//! `LEASH_CERT`/`LEASH_KEY`/`LEASH_CA`, then the `leash dev` directory), with
//! the dev directory's `admin.pem`/`admin-key.pem` as the default SVID. It
//! prints short lines, or with `--json` one JSON object holding the response
//! fields (proto field names, RFC 3339 timestamps, states as lower-case words
//! such as `pending_approval`). A refusal prints `error: <CODE>: <message>`
//! (`NOT_FOUND`, `PERMISSION_DENIED`, ...) and exits 1.

use std::{fmt::Write as _, process::ExitCode};

use clap::{Args, Subcommand, ValueEnum};
use leash_proto::v1::{self as pb, admin_client::AdminClient};
use serde_json::{Value, json};

use super::{
    ConnectArgs,
    task::{CommandError, time, time_text},
};

/// The client role whose dev-directory SVID admin commands use by default
/// (`admin.pem`, `admin-key.pem`; see [`super::dev::ADMIN`]).
pub const ROLE: &str = "admin";

/// Most pages `leash admin tasks --all` fetches; past it the listing stops
/// and prints the token to go on from, so a broker that never ends a listing
/// cannot keep the command running forever.
pub const MAX_PAGES: usize = 1000;

/// Most tasks `--page-size` may ask for (the broker's own ceiling).
pub const MAX_PAGE_SIZE: u32 = 1000;

/// `leash admin`: options for every admin command, and the command.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Print one JSON object with the response fields instead of short lines.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Admin subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List the loaded templates.
    Templates {
        /// Connection (defaults to the dev admin SVID).
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List tasks the broker holds (live ones, and recently ended ones).
    Tasks(TasksArgs),
    /// Show one task.
    Task {
        /// The task id.
        task_id: String,
        /// Connection (defaults to the dev admin SVID).
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Approve a task's pending approval (as one of its template's approvers).
    Approve {
        /// The task id.
        task_id: String,
        /// Why, and connection.
        #[command(flatten)]
        why: Reason,
    },
    /// Deny a task's pending approval (as one of its template's approvers).
    Deny {
        /// The task id.
        task_id: String,
        /// Why, and connection.
        #[command(flatten)]
        why: Reason,
    },
    /// End live tasks at once; all but `revoke task` also set a kill switch.
    Revoke {
        /// What to revoke.
        #[command(subcommand)]
        target: RevokeTarget,
    },
    /// List the kill switches in force.
    KillSwitches {
        /// Connection (defaults to the dev admin SVID).
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Lift a kill switch: what it refused is allowed again (what it revoked stays revoked).
    Lift {
        /// The kill switch's kind, as `kill-switches` lists it.
        kind: KillSwitchKind,
        /// Its value: the SPIFFE ID, prefix, template, class or tenant name.
        value: String,
        /// Why, and connection.
        #[command(flatten)]
        why: Reason,
    },
}

/// Filters and paging of `leash admin tasks`.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only tasks owned by this SPIFFE ID (exactly).
    #[arg(long)]
    pub identity: Option<String>,
    /// Only tasks of this actor class.
    #[arg(long)]
    pub class: Option<String>,
    /// Only tasks of this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only tasks of this template.
    #[arg(long)]
    pub template: Option<String>,
    /// Only tasks in this state.
    #[arg(long)]
    pub state: Option<TaskState>,
    /// Tasks per page [default: the broker's, 100].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PAGE_SIZE)))]
    pub page_size: Option<u32>,
    /// Start at this page (the `next_page_token` of an earlier listing).
    #[arg(long)]
    pub page_token: Option<String>,
    /// Follow `next_page_token` to the end of the listing (at most 1000 pages).
    #[arg(long)]
    pub all: bool,
    /// Also list each task's credentials: ids, grants, audiences and time
    /// left, never values (pages are then at most 100 tasks).
    #[arg(long)]
    pub credentials: bool,
    /// Connection (defaults to the dev admin SVID).
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// What `leash admin revoke` ends.
#[derive(Debug, Subcommand)]
pub enum RevokeTarget {
    /// One live task and its delegated descendants (sets no kill switch).
    Task {
        /// The task id.
        task_id: String,
        /// Why, and connection.
        #[command(flatten)]
        why: Reason,
    },
    /// Every live task of an identity, and refuse its new ones until lifted.
    Identity {
        /// A SPIFFE ID, or with --prefix the start of SPIFFE IDs
        /// (at least `spiffe://<trust domain>/`).
        spiffe_id: String,
        /// Match every SPIFFE ID starting with SPIFFE_ID.
        #[arg(long)]
        prefix: bool,
        /// Why, and connection.
        #[command(flatten)]
        why: Reason,
    },
    /// Every live task of a template, and refuse new ones until lifted.
    Template {
        /// The template name.
        name: String,
        /// Why, and connection.
        #[command(flatten)]
        why: Reason,
    },
    /// Every live task of an actor class, and refuse new ones until lifted.
    Class {
        /// The actor class name.
        name: String,
        /// Why, and connection.
        #[command(flatten)]
        why: Reason,
    },
    /// Every live task of a tenant, and refuse new ones until lifted.
    Tenant {
        /// The tenant name.
        name: String,
        /// Why, and connection.
        #[command(flatten)]
        why: Reason,
    },
}

/// The reason every changing admin command must give, and its connection.
#[derive(Debug, Args)]
pub struct Reason {
    /// Why, for the audit trail (at most 1024 bytes).
    #[arg(long)]
    pub reason: String,
    /// Connection (defaults to the dev admin SVID).
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// The task states `--state` filters on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskState {
    /// The lease is live.
    Active,
    /// Live, with gated grants waiting for an approver.
    #[value(alias = "pending_approval")]
    PendingApproval,
    /// Completed by its owner.
    Completed,
    /// The lease was not renewed in time.
    Expired,
    /// Ended by a kill switch or with its parent task.
    Revoked,
}

impl From<TaskState> for pb::LeaseState {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Active => Self::Active,
            TaskState::PendingApproval => Self::PendingApproval,
            TaskState::Completed => Self::Completed,
            TaskState::Expired => Self::Expired,
            TaskState::Revoked => Self::Revoked,
        }
    }
}

/// The kinds of kill switch, as the broker names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KillSwitchKind {
    /// One SPIFFE ID.
    Identity,
    /// Every SPIFFE ID starting with a prefix.
    #[value(name = "identity_prefix", alias = "identity-prefix")]
    IdentityPrefix,
    /// A template.
    Template,
    /// An actor class.
    Class,
    /// A tenant.
    Tenant,
}

impl KillSwitchKind {
    /// The kind's name in the Admin API (`KillSwitch.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::IdentityPrefix => "identity_prefix",
            Self::Template => "template",
            Self::Class => "class",
            Self::Tenant => "tenant",
        }
    }
}

/// Which decision `Approve`/`Deny` made, for the human line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Approved.
    Approved,
    /// Denied.
    Denied,
}

/// What an admin command got back, ready to print either way.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AdminOutput {
    /// `templates`.
    Templates(pb::ListTemplatesResponse),
    /// `tasks`: every page fetched, and the token of the next one (empty at the end).
    Tasks(pb::ListTasksResponse),
    /// `task`.
    Task(pb::TaskInfo),
    /// `approve` or `deny`: the task after the decision.
    Decided(Decision, pb::TaskInfo),
    /// `revoke ...`.
    Revoked(pb::KillSwitchResponse),
    /// `kill-switches`.
    KillSwitches(pb::ListKillSwitchesResponse),
    /// `lift`: the kill switch asked for, and whether it was in force.
    Lifted {
        /// Its kind.
        kind: String,
        /// Its value.
        value: String,
        /// The broker's answer.
        response: pb::LiftKillSwitchResponse,
    },
}

/// Runs `leash admin ...` and prints its output or error; the exit code to
/// end with (0 success, 1 failure).
pub async fn execute(args: AdminArgs) -> ExitCode {
    let json = args.json;
    match run(args.command).await {
        Ok(out) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out.to_json()).unwrap_or_default()
                );
            } else {
                print!("{}", out.to_text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs one admin command against the broker.
///
/// # Errors
/// [`CommandError`] if the connection fails or the broker refuses.
pub async fn run(cmd: AdminCommand) -> Result<AdminOutput, CommandError> {
    let client = |c: ConnectArgs| async move {
        Ok::<_, CommandError>(AdminClient::new(c.connect(ROLE).await?))
    };
    Ok(match cmd {
        AdminCommand::Templates { connect } => AdminOutput::Templates(
            client(connect)
                .await?
                .list_templates(pb::ListTemplatesRequest {})
                .await?
                .into_inner(),
        ),
        AdminCommand::Tasks(args) => {
            let mut c = client(args.connect.clone()).await?;
            AdminOutput::Tasks(list_tasks(&mut c, args).await?)
        }
        AdminCommand::Task { task_id, connect } => AdminOutput::Task(
            client(connect)
                .await?
                .get_task(pb::GetTaskRequest { task_id })
                .await?
                .into_inner(),
        ),
        AdminCommand::Approve { task_id, why } => {
            let request = pb::DecideApprovalRequest {
                task_id,
                reason: why.reason,
            };
            let task = client(why.connect).await?.approve(request).await?;
            AdminOutput::Decided(Decision::Approved, task.into_inner())
        }
        AdminCommand::Deny { task_id, why } => {
            let request = pb::DecideApprovalRequest {
                task_id,
                reason: why.reason,
            };
            let task = client(why.connect).await?.deny(request).await?;
            AdminOutput::Decided(Decision::Denied, task.into_inner())
        }
        AdminCommand::Revoke { target } => AdminOutput::Revoked(revoke(target).await?),
        AdminCommand::KillSwitches { connect } => AdminOutput::KillSwitches(
            client(connect)
                .await?
                .list_kill_switches(pb::ListKillSwitchesRequest {})
                .await?
                .into_inner(),
        ),
        AdminCommand::Lift { kind, value, why } => {
            let response = client(why.connect)
                .await?
                .lift_kill_switch(pb::LiftKillSwitchRequest {
                    kind: kind.as_str().to_owned(),
                    value: value.clone(),
                    reason: why.reason,
                })
                .await?
                .into_inner();
            AdminOutput::Lifted {
                kind: kind.as_str().to_owned(),
                value,
                response,
            }
        }
    })
}

/// The first `ListTasks` request of `args`.
fn list_request(args: &TasksArgs) -> pb::ListTasksRequest {
    pb::ListTasksRequest {
        identity: args.identity.clone().unwrap_or_default(),
        class: args.class.clone().unwrap_or_default(),
        tenant: args.tenant.clone().unwrap_or_default(),
        template: args.template.clone().unwrap_or_default(),
        state: args
            .state
            .map_or(pb::LeaseState::Unspecified, Into::into)
            .into(),
        page_size: args.page_size.unwrap_or(0),
        page_token: args.page_token.clone().unwrap_or_default(),
        with_credentials: args.credentials,
    }
}

/// A protobuf duration as whole seconds, `12s` (`-` when absent).
fn left_text(d: Option<&prost_types::Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{}s", d.seconds.max(0)))
}

fn credential_json(c: &pb::CredentialInfo) -> Value {
    json!({
        "id": c.id,
        "grant": c.grant,
        "kind": if c.kind == i32::from(pb::CredentialKind::Jwt) { "jwt" } else { "opaque" },
        "audience": c.audience,
        "scopes": c.scopes,
        "expires_at": time(c.expires_at.as_ref()),
        "time_left_s": c.time_left.as_ref().map_or(0, |d| d.seconds.max(0)),
        "bound": c.bound,
    })
}

fn credential_line(c: &pb::CredentialInfo) -> String {
    format!(
        "  credential {}  {}  {}  {} left",
        c.id,
        c.grant,
        c.audience,
        left_text(c.time_left.as_ref())
    )
}

/// One page, or with `--all` every page up to [`MAX_PAGES`], merged.
async fn list_tasks(
    client: &mut AdminClient<tonic::transport::Channel>,
    args: TasksArgs,
) -> Result<pb::ListTasksResponse, CommandError> {
    let mut request = list_request(&args);
    let mut out = pb::ListTasksResponse::default();
    for _ in 0..MAX_PAGES {
        let page = client.list_tasks(request.clone()).await?.into_inner();
        out.tasks.extend(page.tasks);
        out.next_page_token = page.next_page_token;
        if !args.all || out.next_page_token.is_empty() {
            break;
        }
        request.page_token.clone_from(&out.next_page_token);
    }
    Ok(out)
}

async fn revoke(target: RevokeTarget) -> Result<pb::KillSwitchResponse, CommandError> {
    let connect = |c: ConnectArgs| async move {
        Ok::<_, CommandError>(AdminClient::new(c.connect(ROLE).await?))
    };
    let r = match target {
        RevokeTarget::Task { task_id, why } => {
            let request = pb::RevokeTaskRequest {
                task_id,
                reason: why.reason,
            };
            connect(why.connect).await?.revoke_task(request).await?
        }
        RevokeTarget::Identity {
            spiffe_id,
            prefix,
            why,
        } => {
            let request = pb::RevokeIdentityRequest {
                identity: spiffe_id,
                prefix,
                reason: why.reason,
            };
            connect(why.connect).await?.revoke_identity(request).await?
        }
        RevokeTarget::Template { name, why } => {
            let request = pb::RevokeTemplateRequest {
                template: name,
                reason: why.reason,
            };
            connect(why.connect).await?.revoke_template(request).await?
        }
        RevokeTarget::Class { name, why } => {
            let request = pb::RevokeClassRequest {
                class: name,
                reason: why.reason,
            };
            connect(why.connect).await?.revoke_class(request).await?
        }
        RevokeTarget::Tenant { name, why } => {
            let request = pb::RevokeTenantRequest {
                tenant: name,
                reason: why.reason,
            };
            connect(why.connect).await?.revoke_tenant(request).await?
        }
    };
    Ok(r.into_inner())
}

/// The line printed for a failed command: `error: <CODE>: <message>` for a
/// refusal, with the canonical gRPC code name (`NOT_FOUND`, the names the
/// proto documents).
pub fn error_line(e: &CommandError) -> String {
    match e {
        // A broker without the Admin service answers UNIMPLEMENTED with no
        // message; say what that means rather than print nothing.
        CommandError::Status(s) if s.code() == tonic::Code::Unimplemented && s.message().is_empty() => {
            "error: UNIMPLEMENTED: the broker does not serve this call (is it older than this leash?)".to_owned()
        }
        CommandError::Status(s) => {
            format!("error: {}: {}", code_name(s.code()), s.message())
        }
        CommandError::Connect(c) => format!("error: {c}"),
        CommandError::Bench(b) => format!("error: {b}"),
    }
}

/// `NotFound` → `NOT_FOUND`, `Ok` → `OK`: the canonical gRPC name.
pub(super) fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A proto enum value name as a lower-case word: `LEASE_STATE_PENDING_APPROVAL`
/// → `pending_approval`; `unknown` for a number this build does not know.
fn word(name: Option<&str>, prefix: &str) -> String {
    name.map_or_else(
        || "unknown".to_owned(),
        |n| n.strip_prefix(prefix).unwrap_or(n).to_ascii_lowercase(),
    )
}

fn lease_state(v: i32) -> String {
    word(
        pb::LeaseState::try_from(v).ok().map(|s| s.as_str_name()),
        "LEASE_STATE_",
    )
}

fn approval_state(v: i32) -> String {
    word(
        pb::ApprovalState::try_from(v).ok().map(|s| s.as_str_name()),
        "APPROVAL_STATE_",
    )
}

fn approval_json(a: Option<&pb::Approval>) -> Value {
    a.map_or(Value::Null, |a| {
        json!({
            "state": approval_state(a.state),
            "grants": a.grants,
            "expires_at": time(a.expires_at.as_ref()),
            "decided_by": a.decided_by,
            "reason": a.reason,
            "decided_at": time(a.decided_at.as_ref()),
        })
    })
}

fn task_json(t: &pb::TaskInfo) -> Value {
    let parameters: serde_json::Map<String, Value> = t
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "task_id": t.task_id,
        "owner": t.owner,
        "template": t.template,
        "template_version": t.template_version,
        "class": t.class,
        "tenant": t.tenant,
        "intent": t.intent,
        "state": lease_state(t.state),
        "created_at": time(t.created_at.as_ref()),
        "lease_expires_at": time(t.lease_expires_at.as_ref()),
        "max_lifetime_at": time(t.max_lifetime_at.as_ref()),
        "ended_at": time(t.ended_at.as_ref()),
        "outcome": t.outcome,
        "parent_task_id": t.parent_task_id,
        "depth": t.depth,
        "actors": t.actors,
        "approval": approval_json(t.approval.as_ref()),
        "parameters": parameters,
        "time_left_s": t.time_left.as_ref().map_or(0, |d| d.seconds.max(0)),
        "credentials": t.credentials.iter().map(credential_json).collect::<Vec<_>>(),
    })
}

fn kill_switch_json(k: &pb::KillSwitch) -> Value {
    json!({
        "kind": k.kind,
        "value": k.value,
        "reason": k.reason,
        "set_by": k.set_by,
        "set_at": time(k.set_at.as_ref()),
    })
}

/// `1 task`, `3 tasks`.
fn count(n: u32, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

impl AdminOutput {
    /// The `--json` rendering: one object with the response's fields.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Templates(r) => json!({
                "templates": r.templates.iter().map(|t| json!({
                    "name": t.name,
                    "version": t.version,
                    "owner": t.owner,
                    "tenant": t.tenant,
                    "classes": t.classes,
                    "grants": t.grants,
                    "approval_grants": t.approval_grants,
                    "max_delegation_depth": t.max_delegation_depth,
                    "sensitivity": t.sensitivity,
                    "live_tasks": t.live_tasks,
                    "live_credentials": t.live_credentials,
                })).collect::<Vec<_>>(),
            }),
            Self::Tasks(r) => json!({
                "tasks": r.tasks.iter().map(task_json).collect::<Vec<_>>(),
                "next_page_token": r.next_page_token,
            }),
            Self::Task(t) | Self::Decided(_, t) => task_json(t),
            Self::Revoked(r) => json!({
                "kill_switch": r.kill_switch.as_ref().map_or(Value::Null, kill_switch_json),
                "revoked_tasks": r.revoked_tasks,
                "revoked_credentials": r.revoked_credentials,
            }),
            Self::KillSwitches(r) => json!({
                "kill_switches": r.kill_switches.iter().map(kill_switch_json).collect::<Vec<_>>(),
            }),
            Self::Lifted { response, .. } => json!({ "lifted": response.lifted }),
        }
    }

    /// The default rendering: short lines, each ending in a newline.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let mut line = |l: String| {
            let _ = writeln!(s, "{l}");
        };
        match self {
            Self::Templates(r) if r.templates.is_empty() => line("no templates loaded".into()),
            Self::Templates(r) => {
                for t in &r.templates {
                    let mut l = format!(
                        "{} v{}  tenant {}  owner {}  grants {}",
                        t.name,
                        t.version,
                        or_dash(&t.tenant),
                        or_dash(&t.owner),
                        or_dash(&t.grants.join(",")),
                    );
                    if !t.classes.is_empty() {
                        let _ = write!(l, "  classes {}", t.classes.join(","));
                    }
                    if !t.approval_grants.is_empty() {
                        let _ = write!(l, "  approval {}", t.approval_grants.join(","));
                    }
                    let _ = write!(
                        l,
                        "  delegation depth {}  sensitivity {}  live {} tasks, {} credentials",
                        t.max_delegation_depth,
                        or_dash(&t.sensitivity),
                        t.live_tasks,
                        t.live_credentials
                    );
                    line(l);
                }
            }
            Self::Tasks(r) => {
                if r.tasks.is_empty() {
                    line("no tasks".into());
                }
                for t in &r.tasks {
                    line(format!(
                        "{}  {}  {}  {}  lease until {} ({} left)",
                        t.task_id,
                        lease_state(t.state),
                        t.template,
                        t.owner,
                        time_text(t.lease_expires_at.as_ref()).unwrap_or_else(|| "-".into()),
                        left_text(t.time_left.as_ref()),
                    ));
                    for c in &t.credentials {
                        line(credential_line(c));
                    }
                }
                if !r.next_page_token.is_empty() {
                    line(format!("more: --page-token {}", r.next_page_token));
                }
            }
            Self::Task(t) => {
                let when = |ts: Option<&prost_types::Timestamp>| {
                    time_text(ts).unwrap_or_else(|| "-".into())
                };
                line(format!("task {}  {}", t.task_id, lease_state(t.state)));
                line(format!(
                    "  owner     {} (class {}, tenant {})",
                    t.owner,
                    or_dash(&t.class),
                    or_dash(&t.tenant)
                ));
                line(format!(
                    "  template  {} v{}",
                    t.template, t.template_version
                ));
                line(format!("  intent    {}", t.intent));
                line(format!(
                    "  lease     until {} ({} left; max {}), created {}",
                    when(t.lease_expires_at.as_ref()),
                    left_text(t.time_left.as_ref()),
                    when(t.max_lifetime_at.as_ref()),
                    when(t.created_at.as_ref()),
                ));
                if t.ended_at.is_some() || !t.outcome.is_empty() {
                    line(format!(
                        "  ended     {} ({})",
                        when(t.ended_at.as_ref()),
                        or_dash(&t.outcome)
                    ));
                }
                if !t.parent_task_id.is_empty() {
                    line(format!(
                        "  parent    {} (depth {})",
                        t.parent_task_id, t.depth
                    ));
                }
                if !t.actors.is_empty() {
                    line(format!("  actors    {}", t.actors.join(" <- ")));
                }
                if let Some(a) = &t.approval {
                    line(format!(
                        "  approval  {} for {}{}",
                        approval_state(a.state),
                        or_dash(&a.grants.join(",")),
                        if a.decided_by.is_empty() {
                            String::new()
                        } else {
                            format!(" by {}: {}", a.decided_by, a.reason)
                        },
                    ));
                }
                let mut params: Vec<_> = t.parameters.iter().collect();
                params.sort();
                for (k, v) in params {
                    line(format!("  param     {k}={v}"));
                }
                for c in &t.credentials {
                    line(credential_line(c));
                }
            }
            Self::Decided(d, t) => line(format!(
                "{} task {}: approval {}, task {}",
                match d {
                    Decision::Approved => "approved",
                    Decision::Denied => "denied",
                },
                t.task_id,
                t.approval
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |a| approval_state(a.state)),
                lease_state(t.state),
            )),
            Self::Revoked(r) => {
                let mut l = format!(
                    "revoked {}, {}",
                    count(r.revoked_tasks, "task"),
                    count(r.revoked_credentials, "credential")
                );
                if let Some(k) = &r.kill_switch {
                    let _ = write!(l, "; kill switch {} {} in force", k.kind, k.value);
                }
                line(l);
            }
            Self::KillSwitches(r) => {
                if r.kill_switches.is_empty() {
                    line("no kill switches in force".into());
                }
                for k in &r.kill_switches {
                    line(format!(
                        "{} {}  set by {} at {}: {}",
                        k.kind,
                        k.value,
                        or_dash(&k.set_by),
                        time_text(k.set_at.as_ref()).unwrap_or_else(|| "-".into()),
                        k.reason,
                    ));
                }
            }
            Self::Lifted {
                kind,
                value,
                response,
            } => line(if response.lifted {
                format!("lifted kill switch {kind} {value}")
            } else {
                format!("no kill switch {kind} {value} was in force")
            }),
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "a failed unwrap in a test is a failed test"
    )]

    use clap::Parser as _;
    use leash_proto::v1 as pb;
    use serde_json::json;

    use super::{
        AdminArgs, AdminCommand, AdminOutput, Decision, KillSwitchKind, RevokeTarget, TaskState,
        error_line, list_request,
    };
    use crate::cli::{Cli, Command, task::CommandError};

    fn parse(args: &[&str]) -> AdminArgs {
        let argv = ["leash", "admin"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Admin(a) => a,
            other => panic!("not admin: {other:?}"),
        }
    }

    fn refused(args: &[&str]) -> String {
        let argv = ["leash", "admin"].iter().chain(args);
        Cli::try_parse_from(argv).unwrap_err().to_string()
    }

    fn ts(secs: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        })
    }

    #[test]
    fn json_is_global_to_admin() {
        assert!(parse(&["--json", "templates"]).json);
        assert!(parse(&["templates", "--json"]).json);
        assert!(parse(&["revoke", "tenant", "acme", "--reason", "r", "--json"]).json);
        assert!(!parse(&["kill-switches"]).json);
    }

    #[test]
    fn tasks_takes_every_filter_and_paging() {
        let a = parse(&[
            "tasks",
            "--identity",
            "spiffe://leash.dev/agent/demo",
            "--class",
            "agent",
            "--tenant",
            "default",
            "--template",
            "demo",
            "--state",
            "pending-approval",
            "--page-size",
            "50",
            "--page-token",
            "tok",
            "--all",
        ]);
        let AdminCommand::Tasks(t) = a.command else {
            panic!("{:?}", a.command)
        };
        assert!(t.all);
        assert_eq!(t.state, Some(TaskState::PendingApproval));
        let r = list_request(&t);
        assert_eq!(
            r,
            pb::ListTasksRequest {
                identity: "spiffe://leash.dev/agent/demo".into(),
                class: "agent".into(),
                tenant: "default".into(),
                template: "demo".into(),
                state: pb::LeaseState::PendingApproval.into(),
                page_size: 50,
                page_token: "tok".into(),
                with_credentials: false,
            }
        );
        // No filter: everything unspecified, the broker's page size.
        let AdminCommand::Tasks(t) = parse(&["tasks"]).command else {
            panic!()
        };
        assert_eq!(list_request(&t), pb::ListTasksRequest::default());
        for (arg, want) in [
            ("active", pb::LeaseState::Active),
            ("pending_approval", pb::LeaseState::PendingApproval),
            ("completed", pb::LeaseState::Completed),
            ("expired", pb::LeaseState::Expired),
            ("revoked", pb::LeaseState::Revoked),
        ] {
            let AdminCommand::Tasks(t) = parse(&["tasks", "--state", arg]).command else {
                panic!()
            };
            assert_eq!(list_request(&t).state, i32::from(want), "{arg}");
        }
    }

    #[test]
    fn bad_arguments_are_refused_before_connecting() {
        assert!(refused(&["tasks", "--state", "running"]).contains("running"));
        assert!(refused(&["tasks", "--page-size", "0"]).contains("page-size"));
        assert!(refused(&["tasks", "--page-size", "1001"]).contains("page-size"));
        // Every changing command needs a reason.
        for cmd in [
            &["approve", "t1"][..],
            &["deny", "t1"],
            &["revoke", "task", "t1"],
            &["revoke", "identity", "spiffe://x/y"],
            &["revoke", "template", "demo"],
            &["revoke", "class", "agent"],
            &["revoke", "tenant", "acme"],
            &["lift", "tenant", "acme"],
        ] {
            assert!(refused(cmd).contains("--reason"), "{cmd:?}");
        }
        assert!(refused(&["lift", "bogus", "x", "--reason", "r"]).contains("bogus"));
        assert!(refused(&["task"]).contains("TASK_ID"));
    }

    #[test]
    fn revoke_and_lift_parse_their_targets() {
        let a = parse(&[
            "revoke",
            "identity",
            "spiffe://leash.dev/agent/",
            "--prefix",
            "--reason",
            "leak",
            "--cert",
            "/c.pem",
        ]);
        let AdminCommand::Revoke {
            target:
                RevokeTarget::Identity {
                    spiffe_id,
                    prefix,
                    why,
                },
        } = a.command
        else {
            panic!("{:?}", a.command)
        };
        assert_eq!(spiffe_id, "spiffe://leash.dev/agent/");
        assert!(prefix);
        assert_eq!(why.reason, "leak");
        // The admin SVID defaults to the dev directory's admin.pem, unless given.
        let (_, cert, key) = why.connect.files(super::ROLE);
        assert_eq!(cert, std::path::Path::new("/c.pem"));
        assert!(key.ends_with("admin-key.pem"), "{key:?}");

        for (arg, kind) in [
            ("identity", KillSwitchKind::Identity),
            ("identity_prefix", KillSwitchKind::IdentityPrefix),
            ("identity-prefix", KillSwitchKind::IdentityPrefix),
            ("template", KillSwitchKind::Template),
            ("class", KillSwitchKind::Class),
            ("tenant", KillSwitchKind::Tenant),
        ] {
            let AdminCommand::Lift {
                kind: k,
                value,
                why,
            } = parse(&["lift", arg, "v", "--reason", "ok"]).command
            else {
                panic!()
            };
            assert_eq!(k, kind);
            assert_eq!(k.as_str(), arg.replace('-', "_"));
            assert_eq!((value.as_str(), why.reason.as_str()), ("v", "ok"));
        }
        let AdminCommand::Approve { task_id, why } =
            parse(&["approve", "t1", "--reason", "looks right"]).command
        else {
            panic!()
        };
        assert_eq!(
            (task_id.as_str(), why.reason.as_str()),
            ("t1", "looks right")
        );
        let (_, cert, _) = why.connect.files(super::ROLE);
        assert!(cert.ends_with("admin.pem"), "{cert:?}");
    }

    fn task() -> pb::TaskInfo {
        pb::TaskInfo {
            task_id: "t1".into(),
            owner: "spiffe://leash.dev/agent/demo".into(),
            template: "demo".into(),
            template_version: "1".into(),
            class: "agent".into(),
            tenant: "default".into(),
            intent: "review PR 42".into(),
            state: pb::LeaseState::PendingApproval.into(),
            created_at: ts(1_700_000_000),
            lease_expires_at: ts(1_700_000_060),
            max_lifetime_at: ts(1_700_003_600),
            ended_at: None,
            outcome: String::new(),
            parent_task_id: String::new(),
            depth: 0,
            actors: vec!["spiffe://leash.dev/agent/demo".into()],
            approval: Some(pb::Approval {
                state: pb::ApprovalState::Pending.into(),
                grants: vec!["db".into()],
                expires_at: ts(1_700_000_900),
                decided_by: String::new(),
                reason: String::new(),
                decided_at: None,
            }),
            parameters: [("repo".to_owned(), "acme/widgets".to_owned())].into(),
            time_left: Some(prost_types::Duration {
                seconds: 42,
                nanos: 0,
            }),
            credentials: vec![pb::CredentialInfo {
                id: "c1".into(),
                grant: "github".into(),
                kind: pb::CredentialKind::Jwt.into(),
                audience: "https://api.github.test".into(),
                scopes: vec!["repo:read".into()],
                expires_at: ts(1_700_000_060),
                time_left: Some(prost_types::Duration {
                    seconds: 42,
                    nanos: 0,
                }),
                bound: true,
            }],
        }
    }

    fn text_has_credential(text: &str) -> bool {
        text.contains("  credential c1  github  https://api.github.test  42s left\n")
            && text.contains("(42s left; max")
    }

    #[test]
    fn a_task_renders_with_proto_names_rfc3339_and_word_states() {
        let j = AdminOutput::Task(task()).to_json();
        assert_eq!(
            j,
            json!({
                "task_id": "t1",
                "owner": "spiffe://leash.dev/agent/demo",
                "template": "demo",
                "template_version": "1",
                "class": "agent",
                "tenant": "default",
                "intent": "review PR 42",
                "state": "pending_approval",
                "created_at": "2023-11-14T22:13:20Z",
                "lease_expires_at": "2023-11-14T22:14:20Z",
                "max_lifetime_at": "2023-11-14T23:13:20Z",
                "ended_at": null,
                "outcome": "",
                "parent_task_id": "",
                "depth": 0,
                "actors": ["spiffe://leash.dev/agent/demo"],
                "approval": {
                    "state": "pending",
                    "grants": ["db"],
                    "expires_at": "2023-11-14T22:28:20Z",
                    "decided_by": "",
                    "reason": "",
                    "decided_at": null,
                },
                "parameters": { "repo": "acme/widgets" },
                "time_left_s": 42,
                "credentials": [{
                    "id": "c1", "grant": "github", "kind": "jwt",
                    "audience": "https://api.github.test", "scopes": ["repo:read"],
                    "expires_at": "2023-11-14T22:14:20Z", "time_left_s": 42, "bound": true,
                }],
            })
        );
        assert!(text_has_credential(&AdminOutput::Task(task()).to_text()));
        let text = AdminOutput::Task(task()).to_text();
        assert!(text.starts_with("task t1  pending_approval\n"), "{text}");
        assert!(text.contains("approval  pending for db"), "{text}");
        assert!(text.contains("param     repo=acme/widgets"), "{text}");

        let mut done = task();
        done.state = pb::LeaseState::Revoked.into();
        done.approval = None;
        let j = AdminOutput::Decided(Decision::Denied, done.clone()).to_json();
        assert_eq!(
            (j["state"].as_str(), &j["approval"]),
            (Some("revoked"), &json!(null))
        );
        assert_eq!(
            AdminOutput::Decided(Decision::Denied, done).to_text(),
            "denied task t1: approval none, task revoked\n"
        );
        // A state number this build does not know is not guessed at.
        let mut odd = task();
        odd.state = 99;
        assert_eq!(AdminOutput::Task(odd).to_json()["state"], "unknown");
    }

    #[test]
    fn task_lists_render_every_page_and_the_next_token() {
        let out = AdminOutput::Tasks(pb::ListTasksResponse {
            tasks: vec![task(), task()],
            next_page_token: "p2".into(),
        });
        let j = out.to_json();
        assert_eq!(j["tasks"].as_array().unwrap().len(), 2);
        assert_eq!(j["next_page_token"], "p2");
        let text = out.to_text();
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.starts_with(
            "t1  pending_approval  demo  spiffe://leash.dev/agent/demo  lease until 2023-11-14T22:14:20Z (42s left)\n  credential c1  github  https://api.github.test  42s left\n"
        ), "{text}");
        assert!(text.ends_with("more: --page-token p2\n"), "{text}");
        let empty = AdminOutput::Tasks(pb::ListTasksResponse::default());
        assert_eq!(empty.to_text(), "no tasks\n");
        assert_eq!(
            empty.to_json(),
            json!({ "tasks": [], "next_page_token": "" })
        );
    }

    #[test]
    fn kill_switches_render_with_their_counts() {
        let ks = pb::KillSwitch {
            kind: "identity".into(),
            value: "spiffe://leash.dev/agent/demo".into(),
            reason: "leaked".into(),
            set_by: "spiffe://leash.dev/admin/demo".into(),
            set_at: ts(1_700_000_000),
        };
        let revoked = AdminOutput::Revoked(pb::KillSwitchResponse {
            kill_switch: Some(ks.clone()),
            revoked_tasks: 3,
            revoked_credentials: 12,
        });
        assert_eq!(
            revoked.to_text(),
            "revoked 3 tasks, 12 credentials; kill switch identity spiffe://leash.dev/agent/demo in force\n"
        );
        let ks_json = json!({
            "kind": "identity",
            "value": "spiffe://leash.dev/agent/demo",
            "reason": "leaked",
            "set_by": "spiffe://leash.dev/admin/demo",
            "set_at": "2023-11-14T22:13:20Z",
        });
        assert_eq!(
            revoked.to_json(),
            json!({ "kill_switch": ks_json, "revoked_tasks": 3, "revoked_credentials": 12 })
        );
        let one = AdminOutput::Revoked(pb::KillSwitchResponse {
            kill_switch: None,
            revoked_tasks: 1,
            revoked_credentials: 1,
        });
        assert_eq!(one.to_text(), "revoked 1 task, 1 credential\n");
        assert_eq!(one.to_json()["kill_switch"], json!(null));

        let list = AdminOutput::KillSwitches(pb::ListKillSwitchesResponse {
            kill_switches: vec![ks],
        });
        assert_eq!(list.to_json(), json!({ "kill_switches": [ks_json] }));
        assert_eq!(
            list.to_text(),
            "identity spiffe://leash.dev/agent/demo  set by spiffe://leash.dev/admin/demo at 2023-11-14T22:13:20Z: leaked\n"
        );
        assert_eq!(
            AdminOutput::KillSwitches(pb::ListKillSwitchesResponse::default()).to_text(),
            "no kill switches in force\n"
        );
        for lifted in [true, false] {
            let out = AdminOutput::Lifted {
                kind: "tenant".into(),
                value: "acme".into(),
                response: pb::LiftKillSwitchResponse { lifted },
            };
            assert_eq!(out.to_json(), json!({ "lifted": lifted }));
            assert_eq!(
                out.to_text(),
                if lifted {
                    "lifted kill switch tenant acme\n"
                } else {
                    "no kill switch tenant acme was in force\n"
                }
            );
        }
    }

    #[test]
    fn templates_render_every_field() {
        let out = AdminOutput::Templates(pb::ListTemplatesResponse {
            templates: vec![pb::TemplateInfo {
                name: "demo".into(),
                version: "1".into(),
                owner: "platform-team@example.com".into(),
                tenant: "default".into(),
                classes: vec![],
                grants: vec!["github".into(), "db".into()],
                approval_grants: vec!["db".into()],
                max_delegation_depth: 2,
                sensitivity: "low".into(),
                live_tasks: 3,
                live_credentials: 5,
            }],
        });
        assert_eq!(
            out.to_json(),
            json!({ "templates": [{
                "name": "demo", "version": "1", "owner": "platform-team@example.com",
                "tenant": "default", "classes": [], "grants": ["github", "db"],
                "approval_grants": ["db"], "max_delegation_depth": 2, "sensitivity": "low",
                "live_tasks": 3, "live_credentials": 5,
            }]})
        );
        assert_eq!(
            out.to_text(),
            "demo v1  tenant default  owner platform-team@example.com  grants github,db  approval db  delegation depth 2  sensitivity low  live 3 tasks, 5 credentials\n"
        );
    }

    #[test]
    fn refusals_print_the_canonical_code_and_message() {
        for (status, want) in [
            (
                tonic::Status::permission_denied("not an admin caller"),
                "error: PERMISSION_DENIED: not an admin caller",
            ),
            (
                tonic::Status::not_found("no task t9"),
                "error: NOT_FOUND: no task t9",
            ),
            (
                tonic::Status::failed_precondition("no approval pending"),
                "error: FAILED_PRECONDITION: no approval pending",
            ),
            (
                tonic::Status::unimplemented(""),
                "error: UNIMPLEMENTED: the broker does not serve this call (is it older than this leash?)",
            ),
            (
                tonic::Status::unimplemented("in progress"),
                "error: UNIMPLEMENTED: in progress",
            ),
        ] {
            assert_eq!(error_line(&CommandError::Status(status)), want);
        }
    }
}
