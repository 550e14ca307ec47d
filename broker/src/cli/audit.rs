//! `leash audit ...`: the durable audit trail, over the Admin service.
//!
//! - `leash audit trace <task-or-credential-id>` prints the whole story of a
//!   task and its delegated descendants, oldest first (every page);
//! - `leash audit tail [--tenant T]` follows the trail as it grows.
//!
//! Both connect like `leash admin` (the dev directory's admin SVID by
//! default) and print one line per event, or with `--json` one JSON object
//! per line. A refusal prints `error: <CODE>: <message>` and exits 1.

use std::{fmt::Write as _, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};
use leash_proto::v1::{self as pb, admin_client::AdminClient};
use serde_json::{Value, json};

use super::{
    ConnectArgs,
    admin::{MAX_PAGES, ROLE, error_line},
    task::CommandError,
};

/// A timestamp as RFC 3339 with milliseconds (events come many a second).
fn time_text(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
}

/// `leash audit`: the command and its options.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// One JSON object per event, one per line, instead of text lines.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// Audit subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the story of a task and its descendants, oldest first.
    Trace {
        /// A task id, or a credential id (the story of its task).
        id: String,
        /// Connection (defaults to the dev admin SVID).
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Follow the audit trail as it grows.
    Tail {
        /// Only this tenant's events [default: every tenant you may read].
        #[arg(long)]
        tenant: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long (e.g. `30s`).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Connection (defaults to the dev admin SVID).
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// Runs `leash audit ...`, printing events as they come; the exit code.
pub async fn execute(args: AuditArgs) -> ExitCode {
    let json = args.json;
    let print = |e: &pb::AuditEvent| {
        if json {
            println!("{}", event_json(e));
        } else {
            println!("{}", event_line(e));
        }
    };
    match run(args.command, print).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs one audit command, handing each event to `out` in order.
///
/// # Errors
/// [`CommandError`] if the connection fails or the broker refuses.
pub async fn run(
    cmd: AuditCommand,
    mut out: impl FnMut(&pb::AuditEvent),
) -> Result<(), CommandError> {
    match cmd {
        AuditCommand::Trace { id, connect } => {
            let mut client = AdminClient::new(connect.connect(ROLE).await?);
            let mut request = pb::AuditTraceRequest {
                id,
                ..Default::default()
            };
            for _ in 0..MAX_PAGES {
                let page = client.audit_trace(request.clone()).await?.into_inner();
                page.events.iter().for_each(&mut out);
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            Ok(())
        }
        AuditCommand::Tail {
            tenant,
            count,
            duration,
            connect,
        } => {
            let mut client = AdminClient::new(connect.connect(ROLE).await?);
            let mut stream = client
                .audit_tail(pb::AuditTailRequest {
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let end = duration.map(|d| tokio::time::Instant::now() + d);
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                let next = match end {
                    Some(end) => match tokio::time::timeout_at(end, stream.message()).await {
                        Ok(n) => n?,
                        Err(_) => break,
                    },
                    None => stream.message().await?,
                };
                let Some(event) = next else { break };
                out(&event);
                seen += 1;
            }
            Ok(())
        }
    }
}

/// One event as a text line: time, event, task, identity, then the details.
pub fn event_line(e: &pb::AuditEvent) -> String {
    let mut line = format!(
        "{}  {:<20} {}",
        time_text(e.at.as_ref()).unwrap_or_default(),
        e.event,
        if e.task_id.is_empty() {
            "-"
        } else {
            &e.task_id
        }
    );
    for (k, v) in [
        ("identity", &e.identity),
        ("tenant", &e.tenant),
        ("template", &e.template),
        ("parent", &e.parent_task_id),
        ("trace", &e.trace_id),
    ] {
        if !v.is_empty() {
            let _ = write!(line, " {k}={v:?}");
        }
    }
    let mut detail: Vec<_> = e.detail.iter().filter(|(_, v)| !v.is_empty()).collect();
    detail.sort();
    for (k, v) in detail {
        let _ = write!(line, " {k}={v:?}");
    }
    line
}

/// One event as a JSON object (proto field names, RFC 3339 time).
pub fn event_json(e: &pb::AuditEvent) -> Value {
    json!({
        "id": e.id,
        "event": e.event,
        "at": time_text(e.at.as_ref()),
        "task_id": e.task_id,
        "parent_task_id": e.parent_task_id,
        "root_task_id": e.root_task_id,
        "identity": e.identity,
        "actors": e.actors,
        "class": e.class,
        "tenant": e.tenant,
        "template": e.template,
        "template_version": e.template_version,
        "intent": e.intent,
        "trace_id": e.trace_id,
        "detail": e.detail,
    })
}
