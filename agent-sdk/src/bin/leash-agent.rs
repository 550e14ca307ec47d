//! `leash-agent`: runs a program inside a Leash task.
//!
//! `leash-agent exec --template T --param k=v -- CMD ARGS` begins the task, starts
//! CMD with its credentials (environment and a private directory of files that
//! follow every renewal), renews the lease while CMD runs, forwards SIGINT,
//! SIGTERM and SIGHUP to CMD, and completes the task with CMD's outcome. See
//! `docs/sdk.md`.
//!
//! `leash-agent redeem -- CMD ARGS` does the same for a subagent: instead of
//! beginning a task it redeems the delegation its parent made
//! (`Delegation::to_token`, in `LEASH_DELEGATION`) over its own SVID, and runs
//! CMD inside the child task.

use std::{
    ffi::OsString,
    io::Write as _,
    os::unix::{
        fs::{OpenOptionsExt as _, PermissionsExt as _},
        process::ExitStatusExt as _,
    },
    path::{Path, PathBuf},
    process::{ExitCode, ExitStatus},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use leash_sdk::{Client, Credentials, Delegation, Outcome, Task, TaskRequest};
use rustix::process::{Pid, Signal};
use tokio::{
    process::Command,
    signal::unix::{SignalKind, signal},
};

/// Exit status when the task could not begin (bad flags or files, broker refused
/// or unreachable).
const EXIT_CANNOT_BEGIN: u8 = 69;
/// Exit status when the credentials could not be handed to the command.
const EXIT_INTERNAL: u8 = 70;
/// Exit status when the lease was lost while the command ran.
const EXIT_LEASE_LOST: u8 = 75;
/// Exit status when the command could not be started (as shells do).
const EXIT_CANNOT_START: u8 = 127;

/// Runs programs inside Leash tasks, handing them task-scoped credentials.
#[derive(Debug, Parser)]
#[command(name = "leash-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Begin a task, run CMD with its credentials, complete the task with CMD's outcome.
    Exec(ExecArgs),
    /// Redeem a delegation, run CMD with the child task's credentials, complete
    /// the child with CMD's outcome.
    Redeem(RedeemArgs),
}

#[derive(Debug, Args)]
struct RedeemArgs {
    /// The delegation token from the parent (`Delegation::to_token`). It is a
    /// secret: pass it in the environment, since argv is visible to other users.
    #[arg(long, env = "LEASH_DELEGATION", hide_env_values = true)]
    delegation: String,
    /// Time CMD gets between SIGTERM and SIGKILL when the lease is lost.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    grace: Duration,
    #[command(flatten)]
    connect: ConnectArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// Template to declare the task against.
    #[arg(long)]
    template: String,
    /// A template parameter, NAME=VALUE (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// What the task is for, for the audit trail [default: "leash-agent exec PROGRAM"].
    #[arg(long)]
    intent: Option<String>,
    /// Lease TTL to ask for (e.g. 30s) [default: the template's].
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Time CMD gets between SIGTERM and SIGKILL when the lease is lost.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Idempotency key for BeginTask [default: a random one].
    #[arg(long)]
    idempotency_key: Option<String>,
    #[command(flatten)]
    connect: ConnectArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// How to reach the broker; the same flags, variables and defaults as `leash`.
#[derive(Debug, Args)]
struct ConnectArgs {
    /// Broker agent address.
    #[arg(long, env = "LEASH_BROKER", default_value = "https://localhost:8443")]
    broker: String,
    /// PEM bundle the broker's certificate must chain to [default: DEV_DIR/bundle.pem].
    #[arg(long, env = "LEASH_CA")]
    ca: Option<PathBuf>,
    /// Your X509-SVID (PEM) [default: DEV_DIR/agent.pem].
    #[arg(long, env = "LEASH_CERT")]
    cert: Option<PathBuf>,
    /// Your SVID's private key (PEM) [default: DEV_DIR/agent-key.pem].
    #[arg(long, env = "LEASH_KEY")]
    key: Option<PathBuf>,
    /// Directory written by `leash dev` (DEV_DIR), for the defaults above.
    #[arg(long, env = "LEASH_DEV_DIR", default_value = ".leash-dev")]
    dev_dir: PathBuf,
    /// Take the SVID and bundle from the SPIFFE Workload API at this endpoint
    /// (`unix:///path`) instead of files; `--workload-api env` uses SPIFFE_ENDPOINT_SOCKET.
    #[arg(long, env = "LEASH_WORKLOAD_API", conflicts_with_all = ["ca", "cert", "key"])]
    workload_api: Option<String>,
    /// The W3C trace context (`00-<trace id>-<parent id>-<flags>`) the task's
    /// calls carry [default: TRACEPARENT when valid]. CMD gets it as TRACEPARENT.
    #[arg(long)]
    traceparent: Option<String>,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEASH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match Cli::parse().command {
        Sub::Exec(args) => exec(args).await,
        Sub::Redeem(args) => redeem(args).await,
    };
    ExitCode::from(code)
}

/// The client for the connection flags; prints why and gives `None` if it
/// cannot connect.
async fn connect(c: &ConnectArgs) -> Option<Client> {
    let mut builder = Client::builder().broker(&c.broker);
    if let Some(t) = &c.traceparent {
        builder = builder.traceparent(t);
    }
    let builder = match c.workload_api.as_deref() {
        Some("env") => builder.workload_api(),
        Some(endpoint) => builder.workload_api_endpoint(endpoint),
        None => builder
            .bundle_file(c.ca.clone().unwrap_or_else(|| c.dev_dir.join("bundle.pem")))
            .svid_files(
                c.cert
                    .clone()
                    .unwrap_or_else(|| c.dev_dir.join("agent.pem")),
                c.key
                    .clone()
                    .unwrap_or_else(|| c.dev_dir.join("agent-key.pem")),
            ),
    };
    match builder.connect().await {
        Ok(client) => Some(client),
        Err(e) => {
            eprintln!("leash-agent: {e}");
            None
        }
    }
}

/// The whole `redeem` run; returns the exit status.
async fn redeem(args: RedeemArgs) -> u8 {
    // Read the token before connecting: a bad one needs no broker to refuse.
    let delegation = match Delegation::from_token(&args.delegation) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("leash-agent: {e}");
            return EXIT_CANNOT_BEGIN;
        }
    };
    let Some(client) = connect(&args.connect).await else {
        return EXIT_CANNOT_BEGIN;
    };
    let task = match client.redeem_delegation(&delegation).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "leash-agent: cannot redeem the delegation of task {}: {e}",
                delegation.task_id()
            );
            return EXIT_CANNOT_BEGIN;
        }
    };
    tracing::info!(task_id = task.id(), "delegation redeemed");
    run(task, &args.command, args.grace).await
}

/// The whole `exec` run; returns the exit status.
async fn exec(args: ExecArgs) -> u8 {
    let Some(client) = connect(&args.connect).await else {
        return EXIT_CANNOT_BEGIN;
    };
    let program = args.command.first().cloned().unwrap_or_default();
    let mut request =
        TaskRequest::new(&args.template).intent(args.intent.clone().unwrap_or_else(|| {
            let name = Path::new(&program)
                .file_name()
                .unwrap_or(program.as_os_str())
                .to_string_lossy()
                .into_owned();
            format!("leash-agent exec {name}")
        }));
    for (k, v) in &args.params {
        request = request.param(k, v);
    }
    if let Some(ttl) = args.ttl {
        request = request.ttl(ttl);
    }
    if let Some(key) = &args.idempotency_key {
        request = request.idempotency_key(key);
    }
    let task = match client.begin_task(request).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("leash-agent: cannot begin the task: {e}");
            return EXIT_CANNOT_BEGIN;
        }
    };
    tracing::info!(task_id = task.id(), "task begun");
    run(task, &args.command, args.grace).await
}

/// Runs `command` inside `task` (begun or redeemed): hands it the credentials,
/// supervises it, and completes the task with its outcome; returns the exit
/// status.
async fn run(task: Task, command_line: &[OsString], grace: Duration) -> u8 {
    let program = command_line.first().cloned().unwrap_or_default();
    // Dropped (and removed) when this function returns, after the task ended.
    let dir = match credentials_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("leash-agent: cannot create the credentials directory: {e}");
            complete(
                task,
                Outcome::Failed,
                "leash-agent could not set up credentials",
            )
            .await;
            return EXIT_INTERNAL;
        }
    };
    let initial = task.credentials();
    if let Err(e) = write_credentials(dir.path(), &initial) {
        eprintln!("leash-agent: cannot write credentials: {e}");
        complete(
            task,
            Outcome::Failed,
            "leash-agent could not set up credentials",
        )
        .await;
        return EXIT_INTERNAL;
    }

    let mut command = Command::new(&program);
    command
        .args(command_line.iter().skip(1))
        // A spent one-time secret the command has no use for.
        .env_remove("LEASH_DELEGATION")
        .env("LEASH_TASK_ID", task.id())
        .env("LEASH_CREDENTIALS_DIR", dir.path());
    // The task's trace context, so what CMD does joins the same trace; without
    // one, a TRACEPARENT this process was given is not the task's and is removed.
    match task.trace_parent() {
        Some(t) => command.env(leash_sdk::TRACEPARENT_ENV, t.to_string()),
        None => command.env_remove(leash_sdk::TRACEPARENT_ENV),
    };
    for c in initial.iter() {
        command.env(env_name(c.grant()), c.secret());
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "leash-agent: cannot start {}: {e}",
                program.to_string_lossy()
            );
            complete(task, Outcome::Failed, "the command could not be started").await;
            return EXIT_CANNOT_START;
        }
    };
    // The environment now lives in the child; do not keep extra copies around.
    drop(initial);

    let ended = supervise(&task, &mut child, dir.path(), grace).await;
    let (outcome, summary, code) = match ended {
        Ended::Exited(status) => judge(status),
        Ended::LeaseLost(reason) => {
            eprintln!("leash-agent: {reason}; the command was stopped");
            (
                Outcome::Cancelled,
                format!("stopped: {reason}"),
                EXIT_LEASE_LOST,
            )
        }
        Ended::Supervision(e) => {
            eprintln!("leash-agent: {e}");
            let _ = child.start_kill();
            let _ = child.wait().await;
            (
                Outcome::Failed,
                format!("leash-agent failed: {e}"),
                EXIT_INTERNAL,
            )
        }
    };
    complete(task, outcome, summary).await;
    drop(dir);
    code
}

/// How the command's run ended.
enum Ended {
    Exited(ExitStatus),
    LeaseLost(String),
    Supervision(String),
}

/// Runs until the child exits: forwards signals, rewrites credential files on
/// every renewal, and stops the child (SIGTERM, then SIGKILL after `grace`) when
/// the lease is lost.
async fn supervise(
    task: &Task,
    child: &mut tokio::process::Child,
    dir: &Path,
    grace: Duration,
) -> Ended {
    let (mut int, mut term, mut hup) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => return Ended::Supervision("cannot install signal handlers".into()),
    };
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(Pid::from_raw);
    let send = |sig: Signal| {
        if let Some(pid) = pid
            && let Err(e) = rustix::process::kill_process(pid, sig)
        {
            tracing::debug!(error = %e, "signal not delivered (child gone?)");
        }
    };
    let mut credentials = task.watch();
    let lost = task.lease_lost();
    tokio::pin!(lost);
    let mut lost_reason: Option<String> = None;
    let kill_at = tokio::time::sleep(Duration::from_secs(365 * 86_400));
    tokio::pin!(kill_at);
    let mut kill_armed = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                return match (status, lost_reason) {
                    (_, Some(reason)) => Ended::LeaseLost(reason),
                    (Ok(s), None) => Ended::Exited(s),
                    (Err(e), None) => Ended::Supervision(format!("cannot wait for the command: {e}")),
                };
            }
            _ = int.recv() => send(Signal::INT),
            _ = term.recv() => send(Signal::TERM),
            _ = hup.recv() => send(Signal::HUP),
            changed = credentials.changed() => {
                if changed.is_ok() {
                    let fresh = credentials.borrow_and_update().clone();
                    if let Err(e) = write_credentials(dir, &fresh) {
                        tracing::warn!(error = %e, "cannot rewrite credential files");
                    }
                }
            }
            err = &mut lost, if lost_reason.is_none() => {
                lost_reason = Some(err.to_string());
                send(Signal::TERM);
                kill_at.as_mut().reset(tokio::time::Instant::now() + grace);
                kill_armed = true;
            }
            () = &mut kill_at, if kill_armed => {
                kill_armed = false;
                let _ = child.start_kill();
            }
        }
    }
}

/// Outcome, summary and exit status for how the command ended.
fn judge(status: ExitStatus) -> (Outcome, String, u8) {
    match (status.code(), status.signal()) {
        (Some(0), _) => (Outcome::Succeeded, "the command exited 0".into(), 0),
        (Some(code), _) => (
            Outcome::Failed,
            format!("the command exited {code}"),
            u8::try_from(code & 0xff).unwrap_or(1).max(1),
        ),
        (None, Some(sig)) => (
            Outcome::Cancelled,
            format!("the command was killed by signal {sig}"),
            u8::try_from(128 + sig).unwrap_or(255),
        ),
        (None, None) => (Outcome::Failed, "the command ended oddly".into(), 1),
    }
}

async fn complete(task: Task, outcome: Outcome, summary: impl Into<String>) {
    let id = task.id().to_owned();
    match task.complete(outcome, summary).await {
        Ok(_) => tracing::info!(task_id = %id, ?outcome, "task completed"),
        Err(e) => eprintln!(
            "leash-agent: could not complete task {id} ({e}); its credentials die at the lease deadline"
        ),
    }
}

/// A fresh directory only this user can enter.
fn credentials_dir() -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("leash-credentials-")
        .tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Writes one 0600 file per grant, each replaced atomically (temp file + rename)
/// so a reader sees the old value or the new one, never a partial file.
fn write_credentials(dir: &Path, credentials: &Credentials) -> std::io::Result<()> {
    for c in credentials.iter() {
        let grant = c.grant();
        if !safe_file_name(grant) {
            tracing::warn!(grant, "grant name unusable as a file name; no file written");
            continue;
        }
        let tmp = dir.join(format!(".{grant}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(c.secret().as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join(grant))?;
    }
    Ok(())
}

/// Grant names are `[a-z0-9][a-z0-9_-]*` by template rules; check anyway.
fn safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `LEASH_CREDENTIAL_<GRANT>`: upper case, anything not alphanumeric becomes `_`.
fn env_name(grant: &str) -> String {
    let mut s = String::from("LEASH_CREDENTIAL_");
    s.extend(grant.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redeem_takes_the_delegation_from_a_flag_or_the_environment() {
        let cli = Cli::try_parse_from([
            "leash-agent",
            "redeem",
            "--delegation",
            "lsd1.x",
            "--",
            "sh",
            "-c",
            "true",
        ])
        .map_err(|e| e.to_string());
        match cli.map(|c| c.command) {
            Ok(Sub::Redeem(args)) => {
                assert_eq!(args.delegation, "lsd1.x");
                assert_eq!(args.command, ["sh", "-c", "true"]);
                assert_eq!(args.grace, Duration::from_secs(5));
            }
            other => panic!("{other:?}"),
        }
        // Without a command there is nothing to run.
        assert!(Cli::try_parse_from(["leash-agent", "redeem", "--delegation", "lsd1.x"]).is_err());
    }

    #[test]
    fn env_names() {
        assert_eq!(env_name("github"), "LEASH_CREDENTIAL_GITHUB");
        assert_eq!(env_name("db-read.x"), "LEASH_CREDENTIAL_DB_READ_X");
    }

    #[test]
    fn file_names() {
        assert!(safe_file_name("github"));
        assert!(safe_file_name("db_ro-1"));
        for bad in ["", ".x", "a/b", "..", "a b"] {
            assert!(!safe_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(judge(ExitStatus::from_raw(0)).2, 0);
        assert_eq!(judge(ExitStatus::from_raw(1 << 8)).0, Outcome::Failed);
        assert_eq!(judge(ExitStatus::from_raw(1 << 8)).2, 1);
        let (o, _, code) = judge(ExitStatus::from_raw(9));
        assert_eq!((o, code), (Outcome::Cancelled, 137));
    }
}
