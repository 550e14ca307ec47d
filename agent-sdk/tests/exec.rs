//! `leash-agent exec` against a real broker: outcomes, exit statuses, the child's
//! environment and files, rotation, signals, lease loss, and a killed agent.
#![expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use leash_e2e::{BrokerOptions, TestBroker, eventually, is_active};
use tokio::process::{Child, Command};

/// 1 s leases, renewable for a minute; one JWT and one opaque grant.
const EXEC_TEMPLATE: &str = r#"
name: exec
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: { ttl: 1s, max_ttl: 2s, max_lifetime: 1m }
grants:
  - { name: github, kind: jwt, audience: "https://api.github.test", scopes: [{scope: "repo:read", class: read}], ttl: 60s }
  - { name: db-main, kind: opaque, audience: "postgres://db.acme.test/app", scopes: [{scope: "db:app:select", class: read}], ttl: 60s }
"#;

/// 1 s leases that cannot be renewed past 2 s.
const SHORT_TEMPLATE: &str = r#"
name: short
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: { ttl: 1s, max_ttl: 1s, max_lifetime: 2s }
grants:
  - { name: db-main, kind: opaque, audience: "postgres://db.acme.test/app", scopes: [{scope: "db:app:select", class: read}], ttl: 60s }
"#;

struct Harness {
    broker: TestBroker,
    out: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let mut options = BrokerOptions::memory();
        options.templates = vec![EXEC_TEMPLATE.to_owned(), SHORT_TEMPLATE.to_owned()];
        Self {
            broker: TestBroker::start(options).await,
            out: tempfile::tempdir().unwrap(),
        }
    }

    /// `leash-agent exec --template T -- sh -c SCRIPT`, with `$OUT` for the script's reports.
    fn spawn(&self, template: &str, extra: &[&str], script: &str) -> Child {
        self.spawn_with_env(template, extra, script, &[])
    }

    /// [`Harness::spawn`] with extra environment variables (and no inherited `TRACEPARENT`).
    fn spawn_with_env(
        &self,
        template: &str,
        extra: &[&str],
        script: &str,
        env: &[(&str, &str)],
    ) -> Child {
        let svid = self.broker.pki.svid("agent/exec");
        Command::new(env!("CARGO_BIN_EXE_leash-agent"))
            .env_remove("TRACEPARENT")
            .envs(env.iter().copied())
            .args(["exec", "--template", template, "--intent", "exec test"])
            .args(extra)
            .args(["--", "sh", "-c", script])
            .env("LEASH_BROKER", self.broker.url())
            .env("LEASH_CA", self.broker.pki.bundle())
            .env("LEASH_CERT", &svid.cert)
            .env("LEASH_KEY", &svid.key)
            .env("OUT", self.out.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    async fn run(&self, template: &str, script: &str) -> ExitStatus {
        let mut child = self.spawn(template, &[], script);
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("leash-agent did not finish")
            .unwrap()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.path().join(name))
            .unwrap_or_else(|e| panic!("the command did not report {name}: {e}"))
            .trim_end_matches('\n')
            .to_owned()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.out.path().join(name)
    }

    /// Asserts the audit trail recorded `task_id` completing with `outcome`.
    fn assert_outcome(&self, task_id: &str, outcome: &str) {
        let logs = leash_e2e::logs();
        assert!(
            logs.lines().any(|l| l.contains("task.completed")
                && l.contains(task_id)
                && l.contains(&format!("outcome=\"{outcome}\""))),
            "no task.completed with outcome {outcome} for {task_id}:\n{}",
            logs.lines()
                .filter(|l| l.contains(task_id) && l.contains("leash::audit"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Reports the task id, both credentials (env and file), modes and the directory.
const REPORT: &str = r#"
printf %s "$LEASH_TASK_ID" > "$OUT/task"
printf %s "$LEASH_CREDENTIAL_GITHUB" > "$OUT/env_github"
printf %s "$LEASH_CREDENTIAL_DB_MAIN" > "$OUT/env_db"
cat "$LEASH_CREDENTIALS_DIR/github" > "$OUT/file_github"
cat "$LEASH_CREDENTIALS_DIR/db-main" > "$OUT/file_db"
stat -c %a "$LEASH_CREDENTIALS_DIR/db-main" > "$OUT/file_mode"
stat -c %a "$LEASH_CREDENTIALS_DIR" > "$OUT/dir_mode"
printf %s "$LEASH_CREDENTIALS_DIR" > "$OUT/dir"
"#;

async fn assert_all_inactive(h: &Harness) {
    for name in ["env_github", "env_db"] {
        let value = h.read(name);
        assert!(!value.is_empty());
        assert!(
            !is_active(&h.broker, &value).await,
            "{name} still active after exec returned"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_0_completes_as_succeeded_and_hands_over_credentials() {
    let h = Harness::start().await;
    let status = h.run("exec", &format!("{REPORT}\nexit 0")).await;
    assert_eq!(status.code(), Some(0));
    let task = h.read("task");
    assert!(task.starts_with("tk_"), "{task}");
    assert_eq!(h.read("env_db"), h.read("file_db"));
    assert_eq!(h.read("env_github"), h.read("file_github"));
    assert!(h.read("env_db").starts_with("lsh_"));
    assert_eq!(h.read("file_mode"), "600");
    assert_eq!(h.read("dir_mode"), "700");
    assert!(
        !Path::new(&h.read("dir")).exists(),
        "credentials directory left behind"
    );
    h.assert_outcome(&task, "succeeded");
    assert_all_inactive(&h).await;
    leash_e2e::assert_not_logged(&[h.read("env_db"), h.read("env_github")]);
}

/// The child sees the task's W3C trace context as `TRACEPARENT`: from
/// `--traceparent`, else from the agent's own `TRACEPARENT`; an invalid one is
/// not passed on (and does not stop the task).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_child_sees_the_tasks_traceparent() {
    const FLAG: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const ENV: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let h = Harness::start().await;
    let report = r#"printf %s "${TRACEPARENT-unset}" > "$OUT/traceparent"; exit 0"#;
    for (extra, env, want) in [
        (
            vec!["--traceparent", FLAG],
            vec![("TRACEPARENT", ENV)],
            FLAG,
        ),
        (vec![], vec![("TRACEPARENT", ENV)], ENV),
        (vec![], vec![("TRACEPARENT", "00-NOT-A-TRACE-01")], "unset"),
        (vec![], vec![], "unset"),
    ] {
        let mut child = h.spawn_with_env("exec", &extra, report, &env);
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("leash-agent did not finish")
            .unwrap();
        assert_eq!(status.code(), Some(0), "{extra:?} {env:?}");
        assert_eq!(h.read("traceparent"), want, "{extra:?} {env:?}");
    }
    // A malformed explicit one is a usage error: nothing begins.
    let mut child = h.spawn("exec", &["--traceparent", "00-abc-01"], "exit 0");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("leash-agent did not finish")
        .unwrap();
    assert_eq!(status.code(), Some(69));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_1_completes_as_failed_and_exits_1() {
    let h = Harness::start().await;
    let status = h.run("exec", &format!("{REPORT}\nexit 1")).await;
    assert_eq!(status.code(), Some(1));
    h.assert_outcome(&h.read("task"), "failed");
    assert_all_inactive(&h).await;
    assert!(!Path::new(&h.read("dir")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_killed_by_a_signal_is_cancelled_and_exits_128_plus_signal() {
    let h = Harness::start().await;
    let status = h.run("exec", &format!("{REPORT}\nkill -9 $$")).await;
    assert_eq!(status.code(), Some(137));
    h.assert_outcome(&h.read("task"), "cancelled");
    assert_all_inactive(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credential_files_follow_every_renewal_atomically() {
    let h = Harness::start().await;
    let script = format!(
        "{REPORT}\nfor i in 1 2 3 4 5 6 7 8 9 10 11 12; do cat \"$LEASH_CREDENTIALS_DIR/db-main\" >> \"$OUT/seen\"; echo >> \"$OUT/seen\"; sleep 0.25; done"
    );
    let status = h.run("exec", &script).await;
    assert_eq!(status.code(), Some(0));
    let seen = h.read("seen");
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.len(), 12);
    assert!(
        lines.iter().all(|l| l.starts_with("lsh_") && l.len() > 20),
        "a partial file was read: {lines:?}"
    );
    let distinct: std::collections::HashSet<_> = lines.iter().collect();
    assert!(
        distinct.len() >= 3,
        "files did not rotate in 3 s of 1 s leases"
    );
    for value in distinct {
        assert!(!is_active(&h.broker, value).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_to_the_agent_is_forwarded_to_the_command() {
    let h = Harness::start().await;
    let mut agent = h.spawn("exec", &[], &format!("{REPORT}\nexec sleep 30"));
    let ready = eventually(Duration::from_secs(10), || async { h.path("dir").exists() }).await;
    assert!(ready.is_some(), "the command never started");
    let pid = agent.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("agent did not stop")
        .unwrap();
    assert_eq!(status.code(), Some(143));
    h.assert_outcome(&h.read("task"), "cancelled");
    assert_all_inactive(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_lease_stops_the_command() {
    let h = Harness::start().await;
    let start = Instant::now();
    // `trap '' TERM` makes the shell ignore SIGTERM, so only the SIGKILL after the
    // 500 ms grace stops it.
    let mut agent = h.spawn(
        "short",
        &["--grace", "500ms"],
        "printf %s \"$LEASH_CREDENTIAL_DB_MAIN\" > \"$OUT/env_db\"; trap '' TERM; while true; do sleep 0.1; done",
    );
    let status = tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .expect("agent did not stop after the lease was lost")
        .unwrap();
    assert_eq!(status.code(), Some(75));
    assert!(start.elapsed() < Duration::from_secs(8));
    assert!(!is_active(&h.broker, &h.read("env_db")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_agent_leaves_its_credentials_to_die_at_the_lease_deadline() {
    let h = Harness::start().await;
    let mut agent = h.spawn(
        "exec",
        &[],
        &format!("{REPORT}\nprintf %s $$ > \"$OUT/pid\"\nexec sleep 30"),
    );
    let ready = eventually(Duration::from_secs(10), || async {
        h.path("pid").exists() && h.path("dir").exists()
    })
    .await;
    assert!(ready.is_some(), "the command never started");
    let db = h.read("env_db");
    assert!(is_active(&h.broker, &db).await);
    agent.start_kill().unwrap(); // SIGKILL: no chance to complete the task
    agent.wait().await.unwrap();
    let killed_at = Instant::now();
    // The lease (1 s) was renewed at most 1 s before; it must lapse, and the
    // reaper revoke everything, within the deadline + 1.5 s.
    let gone = eventually(Duration::from_millis(2500), || async {
        !is_active(&h.broker, &db).await && !is_active(&h.broker, &h.read("env_github")).await
    })
    .await;
    let _ = Command::new("kill")
        .args(["-9", &h.read("pid")])
        .status()
        .await;
    assert!(
        gone.is_some(),
        "credentials still active {:?} after the agent was killed",
        killed_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_can_take_its_svid_from_the_workload_api() {
    use leash_e2e::workload_api::{SvidKind, TestWorkloadApi};
    let h = Harness::start().await;
    let api = TestWorkloadApi::start(h.broker.pki.clone(), "agent/exec-wl", SvidKind::Client).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_leash-agent"))
        .args(["exec", "--template", "exec", "--intent", "exec test"])
        .args(["--workload-api", &api.endpoint])
        .args(["--", "sh", "-c", &format!("{REPORT}\nexit 0")])
        .env("LEASH_BROKER", h.broker.url())
        .env_remove("LEASH_CA")
        .env_remove("LEASH_CERT")
        .env_remove("LEASH_KEY")
        .env("OUT", h.out.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("leash-agent did not finish")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let task = h.read("task");
    h.assert_outcome(&task, "succeeded");
    assert!(
        leash_e2e::logs()
            .lines()
            .any(|l| l.contains("task.begun") && l.contains(&task) && l.contains("agent/exec-wl")),
        "the task was not declared by the Workload API's SVID"
    );
    assert_all_inactive(&h).await;
}
