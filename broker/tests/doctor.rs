//! `leash doctor` with the real `leash` binary: against `leash dev` every check
//! passes (the embedded store's lack of persistence is a warning) and the
//! revocation probe prints its figures; against a broker whose Redis evicts
//! keys, doctor fails and names `maxmemory-policy`.
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use leash_e2e::RedisServer;

const LEASH: &str = env!("CARGO_BIN_EXE_leash");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `leash dev` (with `extra` arguments) on free ports and waits until
/// it says it serves (its store checked). Free ports are only free when picked: another test may
/// take one first, so a dev that cannot listen is started again on others.
fn start_dev(dir: &Path, extra: &[&str]) -> (Dev, u16) {
    let log = dir.with_extension("log");
    for _ in 0..5 {
        let (agent, ops) = (free_port(), free_port());
        if agent == ops {
            continue;
        }
        let child = Command::new(LEASH)
            .args(["dev", "--dir"])
            .arg(dir)
            .args(["--agent-addr", &format!("127.0.0.1:{agent}")])
            .args(["--ops-addr", &format!("127.0.0.1:{ops}")])
            .args(["--oauth-addr", &format!("127.0.0.1:{}", free_port())])
            .args(extra)
            .env("LEASH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut dev = Dev(child);
        // Printed once both listeners are bound, by this process; then the
        // broker logs that it serves, once it checked its store.
        let banner = format!("leash dev is serving on https://localhost:{agent}");
        let start = Instant::now();
        loop {
            if std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains(&banner) && l.contains("leash broker serving"))
            {
                return (dev, agent);
            }
            if dev.0.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "leash dev did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!(
        "leash dev could not start on free ports:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

fn doctor(dir: &Path, port: u16) -> (Output, String) {
    let out = Command::new(LEASH)
        .arg("doctor")
        .env("LEASH_DEV_DIR", dir)
        .env("LEASH_BROKER", format!("https://localhost:{port}"))
        .env_remove("LEASH_CA")
        .env_remove("LEASH_CERT")
        .env_remove("LEASH_KEY")
        .env_remove("LEASH_CANARY_CERT")
        .env_remove("LEASH_CANARY_KEY")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// The line of check `name`.
fn check<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| {
            l.split_once(' ')
                .is_some_and(|(_, rest)| rest.starts_with(&format!("{name}:")))
        })
        .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
}

#[test]
fn doctor_passes_against_leash_dev_and_prints_its_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let (_dev, port) = start_dev(&dir, &[]);
    for f in [
        "canary.pem",
        "canary-key.pem",
        "templates/leash-canary.yaml",
    ] {
        assert!(dir.join(f).is_file(), "{f} not written");
    }
    let (out, text) = doctor(&dir, port);
    assert!(
        out.status.success(),
        "doctor failed: {}\n{text}",
        out.status
    );
    assert!(
        check(&text, "store persistence").starts_with("WARN ")
            && text.contains("state is not persisted (leash dev only"),
        "{text}"
    );
    for name in [
        "store eviction",
        "clock skew",
        "trust bundle expiry",
        "signing key age",
        "revocation probe",
    ] {
        assert!(check(&text, name).starts_with("PASS "), "{name}:\n{text}");
    }
    // Figures: the dev CA's remaining validity in days, the probe's latencies.
    assert!(
        check(&text, "trust bundle expiry").contains(" days"),
        "{text}"
    );
    let probe = check(&text, "revocation probe");
    assert!(probe.ends_with(" ms)") || probe.ends_with(" s)"), "{probe}");
    for figure in [
        "begin task",
        "complete task",
        "introspect inactive",
        "verifier rejects",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(figure) && l.contains(" ms")),
            "{figure} missing:\n{text}"
        );
    }
    assert!(!text.contains("FAIL "), "{text}");
    assert!(text.trim_end().ends_with(" 0 failed"), "{text}");

    // The probe as an identity the canary template does not allow fails,
    // naming the step; so does Diagnose as a non-admin.
    let out = Command::new(LEASH)
        .arg("doctor")
        .env("LEASH_DEV_DIR", &dir)
        .env("LEASH_BROKER", format!("https://localhost:{port}"))
        .args(["--cert"])
        .arg(dir.join("agent.pem"))
        .args(["--key"])
        .arg(dir.join("agent-key.pem"))
        .args(["--canary-cert"])
        .arg(dir.join("agent.pem"))
        .args(["--canary-key"])
        .arg(dir.join("agent-key.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        check(&text, "diagnose").contains("PERMISSION_DENIED"),
        "{text}"
    );
    assert!(
        check(&text, "revocation probe").contains("begin task:"),
        "{text}"
    );
}

#[test]
fn doctor_fails_against_a_broker_whose_redis_evicts() {
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let (_dev, port) = start_dev(&dir, &["--redis", &redis.url()]);
    // The broker refuses to start on an evicting Redis; one reconfigured
    // under it is what doctor is for.
    assert_eq!(
        redis.command("CONFIG SET maxmemory-policy allkeys-lru"),
        "+OK"
    );
    let (out, text) = doctor(&dir, port);
    assert!(!out.status.success(), "doctor passed:\n{text}");
    let eviction = check(&text, "store eviction");
    assert!(
        eviction.starts_with("FAIL ")
            && eviction.contains("maxmemory-policy is \"allkeys-lru\"")
            && eviction.contains("set maxmemory-policy noeviction"),
        "{text}"
    );
    // The other store checks still report what they found.
    assert!(
        check(&text, "store persistence").contains("redis "),
        "{text}"
    );
    assert!(check(&text, "clock skew").starts_with("PASS "), "{text}");
}
