//! The ceilings of this machine, measured in the same run as the figures:
//! ring on one core, raw rustls handshakes, and Redis running the store's own
//! begin script; and `--live`, Redis memory per live lease.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Ceilings, CommandError, Ctx, Report, Row, Samples, Stop, connect, verify::one_core};
use crate::{
    audit::AuditRetention,
    clock::SystemClock,
    store::{
        BeginQuota, CredentialId, CredentialRecord, Durability, LeaseStore, RedisStore,
        RedisStoreOptions, StoreClock, StoredKind, TaskBinding, TaskId, TaskRecord, TaskState,
    },
    templates::ScopeClass,
};

fn err(what: &str, e: impl std::fmt::Display) -> CommandError {
    CommandError::Bench(format!("{what}: {e}"))
}

/// ring sign and verify on one core, raw handshakes, the store's begin script;
/// then the derived BeginTask ceiling
/// `1 / (1/echo + 1/(sign × cores) + 1/script)` at the run's highest concurrency.
pub(super) async fn measure(
    ctx: &Ctx,
    report: &mut Report,
    echo: &HashMap<usize, f64>,
) -> Ceilings {
    let d = ctx.args.duration.min(Duration::from_secs(5));
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .ok()
        .and_then(|doc| ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).ok());
    let (mut sign_rate, mut verify_rate) = (0.0, 0.0);
    if let Some(pair) = pair {
        // A message the size of a Leash JWT's signing input.
        let msg = vec![b'a'; 700];
        let public = ring::signature::KeyPair::public_key(&pair)
            .as_ref()
            .to_vec();
        let sig = pair.sign(&msg).as_ref().to_vec();
        let pair = Arc::new(pair);
        let (p, m) = (Arc::clone(&pair), msg.clone());
        sign_rate = one_core(d, move || p.sign(&m).as_ref().len() == 64).await.0;
        verify_rate = one_core(d, move || {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
                .verify(&msg, &sig)
                .is_ok()
        })
        .await
        .0;
    }
    report
        .rows
        .push(Row::new("ring Ed25519 sign (1 core)", 1, sign_rate));
    report.rows.push(Row::new(
        "ring Ed25519 verify (1 core, 700 B)",
        1,
        verify_rate,
    ));
    let handshakes = match connect::raw_handshakes(&ctx.args.concurrency, ctx.args.duration).await {
        Ok(h) => {
            let mut cs: Vec<_> = h.iter().collect();
            cs.sort_unstable_by_key(|(c, _)| **c);
            for (c, rate) in cs {
                report
                    .rows
                    .push(Row::new("raw rustls mTLS handshake", *c, *rate));
            }
            Some(h)
        }
        Err(e) => {
            let mut row = Row::new("raw rustls mTLS handshake", 0, 0.0);
            row.note = e.to_string();
            report.rows.push(row);
            None
        }
    };
    let top = ctx.args.concurrency.iter().copied().max().unwrap_or(1);
    let script = match ctx.args.redis_url.as_deref() {
        Some(url) => match store_begins(ctx, url, top, None).await {
            Ok((mut row, _)) => {
                row.name = "Redis: store begin script".into();
                row.note = "the store's real begin script and records, driven in-process".into();
                let rate = row.rate;
                report.rows.push(row);
                rate
            }
            Err(e) => {
                let mut row = Row::new("Redis: store begin script", top, 0.0);
                row.note = e.to_string();
                report.rows.push(row);
                0.0
            }
        },
        None => 0.0,
    };
    let echo_top = echo.get(&top).copied().unwrap_or(0.0);
    #[expect(clippy::cast_precision_loss, reason = "core count")]
    let cores = report.cores as f64;
    // Per call, the echo's cost, one signature spread over the cores, and one
    // store script (left out, and said so, without a Redis to measure).
    let script_cost = if script > 0.0 { 1.0 / script } else { 0.0 };
    let derived_begin = if echo_top > 0.0 && sign_rate > 0.0 {
        1.0 / (1.0 / echo_top + 1.0 / (sign_rate * cores) + script_cost)
    } else {
        0.0
    };
    let mut row = Row::new("derived BeginTask ceiling", top, derived_begin);
    row.note = if script > 0.0 {
        format!(
            "1/(1/echo {echo_top:.0} + 1/(sign {sign_rate:.0} x {cores} cores) + 1/script {script:.0})"
        )
    } else {
        format!(
            "1/(1/echo {echo_top:.0} + 1/(sign {sign_rate:.0} x {cores} cores)); no store script term (no --redis-url)"
        )
    };
    report.rows.push(row);
    Ceilings {
        derived_begin,
        handshakes,
    }
}

/// A store on `url` under a key prefix of its own.
fn store(url: &str, prefix: &str) -> Result<RedisStore, CommandError> {
    RedisStore::connect(
        url,
        RedisStoreOptions {
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(10),
            retention: Duration::from_secs(3600),
            durability: Durability::None,
            clock: StoreClock::Store,
            local_clock: Arc::new(SystemClock),
            audit: AuditRetention::default(),
        },
    )
    .map_err(|e| err("bench store", e))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A task as the lease service writes one for the `bench-jwt` template, with
/// one JWT grant, living `ttl_ms`.
fn records(n: u64, ttl_ms: u64) -> (TaskRecord, Vec<CredentialRecord>) {
    let mut bytes = [0u8; 16];
    let mut cbytes = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut cbytes);
    let id = TaskId::from_bytes(bytes);
    let now = now_ms();
    let owner = "spiffe://leash.dev/agent/demo".to_owned();
    let thumb = "8sK-H0pE6atqQ6M83P8qsLIzIFtAPt0tlalpV4r7X6M".to_owned();
    let task = TaskRecord {
        id: id.clone(),
        owner: owner.clone(),
        template: "bench-jwt".into(),
        template_version: "1".into(),
        parameters: BTreeMap::from([("repo".to_owned(), "acme/widgets".to_owned())]),
        intent: format!("bench agent 0 task {n}"),
        fingerprint: hex::encode([7u8; 32]),
        created_at_ms: now,
        lease_ttl_ms: ttl_ms,
        lease_deadline_ms: now + ttl_ms,
        max_deadline_ms: now + ttl_ms.max(3_600_000),
        state: TaskState::Active,
        ended_at_ms: None,
        outcome: None,
        binding: TaskBinding::Certificate {
            x5t_s256: thumb.clone(),
            spki_s256: "w6-7I9dIwQQBktGK0Fqca9NzGsEFI3U1CHhr7iJ0eKc".into(),
        },
        class: "agent".into(),
        tenant: "default".into(),
        parent: None,
        root: None,
        depth: 0,
        actors: Vec::new(),
        delegated: None,
        approval: None,
        policies: Vec::new(),
    };
    let credential = CredentialRecord {
        id: CredentialId::new(&id, cbytes),
        grant: "github".into(),
        kind: StoredKind::Jwt,
        audience: "https://api.github.example".into(),
        scopes: vec![
            "repo:acme/widgets:read".into(),
            "pulls:acme/widgets:comment".into(),
        ],
        scope_classes: vec![ScopeClass::Read, ScopeClass::Write],
        value_sha256: hex::encode([9u8; 32]),
        subject: owner,
        actors: Vec::new(),
        issuer: "https://leash.dev".into(),
        template: "bench-jwt".into(),
        cnf_x5t_s256: Some(thumb),
        issued_at_ms: now,
        expires_at_ms: now + ttl_ms.min(60_000),
        tenant: "default".into(),
    };
    (task, vec![credential])
}

/// Begins tasks through the store's own begin script at `concurrency` for the
/// run's duration (or exactly `count` of them), under a fresh prefix; returns
/// the rate row and the prefix.
async fn store_begins(
    ctx: &Ctx,
    url: &str,
    concurrency: usize,
    count: Option<(u64, u64)>,
) -> Result<(Row, String), CommandError> {
    let mut tag = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag);
    let prefix = format!("leash-bench-{}", hex::encode(tag));
    let store = Arc::new(store(url, &prefix)?);
    let (duration, budget, ttl) = match count {
        Some((n, ttl)) => (Duration::from_secs(3600), n, ttl),
        None => (ctx.args.duration, ctx.args.max_tasks, 60_000),
    };
    let stop = Stop::new(duration, budget);
    let r0 = ctx.redis_cpu_us().await;
    let (samples, elapsed) = super::drive(concurrency, &stop, |_, stop| {
        let store = Arc::clone(&store);
        async move {
            let mut s = Samples::default();
            let mut n = 0;
            while stop.go() {
                n += 1;
                let (task, creds) = records(n, ttl);
                let t = Instant::now();
                match store
                    .begin_with_quota(&task, &creds, BeginQuota::default())
                    .await
                {
                    Ok(_) => s.ok("begin script", t.elapsed()),
                    Err(e) => s.failed(&tonic::Status::unavailable(e.to_string())),
                }
            }
            s
        }
    })
    .await;
    let r1 = ctx.redis_cpu_us().await;
    let mut rows = super::rows_of(samples, elapsed, concurrency, (None, None), (r0, r1));
    let row = rows
        .pop()
        .unwrap_or_else(|| Row::new("begin script", concurrency, 0.0));
    if count.is_none() {
        cleanup(url, &prefix).await;
    }
    Ok((row, prefix))
}

/// Deletes every key of a bench prefix (bounded: at most 100,000 SCAN pages).
async fn cleanup(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    for pattern in [format!("{{{prefix}:*"), format!("{prefix}:*")] {
        let mut cursor: u64 = 0;
        for _ in 0..100_000 {
            let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
            else {
                break;
            };
            if !keys.is_empty() {
                let _: Result<u64, _> =
                    redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
}

async fn memory_of(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> u64 {
    let mut total = 0;
    let mut cursor: u64 = 0;
    for _ in 0..100_000 {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
        else {
            break;
        };
        for k in keys {
            let m: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&k)
                .query_async(conn)
                .await
                .ok()
                .flatten();
            total += m.unwrap_or(0);
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    total
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `--live N`: N leases with 12-hour TTLs through the store's begin script;
/// Redis memory per live lease, with and without the audit streams (bounded
/// by `[audit] max_len`, not by the leases), and one task's keys.
pub(super) async fn live(ctx: &Ctx, n: u64, report: &mut Report) -> Result<(), CommandError> {
    let url = ctx
        .args
        .redis_url
        .as_deref()
        .ok_or_else(|| CommandError::Bench("--live needs --redis-url".into()))?;
    let client = redis::Client::open(url).map_err(|e| err("--redis-url", e))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| err("Redis", e))?;
    let before = used_memory(&mut conn).await;
    let (mut row, prefix) = store_begins(ctx, url, 64, Some((n, 12 * 3_600_000))).await?;
    let after = used_memory(&mut conn).await;
    let audit = memory_of(&mut conn, &format!("{{{prefix}:s*}}:audit:*")).await;
    let sample_task = {
        let keys: Vec<String> = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg(format!("{{{prefix}:s*}}:task:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async::<(u64, Vec<String>)>(&mut conn)
            .await
            .map(|(_, k)| k)
            .unwrap_or_default();
        keys.first().cloned()
    };
    let mut per_key = Vec::new();
    if let Some(task_key) = sample_task
        && let Some((tag, id)) = task_key.split_once(":task:")
    {
        for kind in ["task", "creds", "cexp", "cgr", "tev"] {
            let k = format!("{tag}:{kind}:{id}");
            let m: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .ok()
                .flatten();
            let enc: Option<String> = redis::cmd("OBJECT")
                .arg("ENCODING")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .ok();
            per_key.push(format!(
                "{kind} {} B {}",
                m.unwrap_or(0),
                enc.unwrap_or_default()
            ));
        }
    }
    let n_f = n.max(1) as f64;
    #[expect(clippy::cast_precision_loss, reason = "bytes for display")]
    let (total, state) = (
        after.saturating_sub(before) as f64 / n_f,
        after.saturating_sub(before).saturating_sub(audit) as f64 / n_f,
    );
    row.name = format!("live leases begun ({n})");
    report.rows.push(row);
    let mut mem = Row::new("Redis bytes per live lease (all)", 64, total);
    mem.note = format!("INFO used_memory delta / {n}, audit streams included");
    report.rows.push(mem);
    let mut st = Row::new("Redis bytes per live lease (state)", 64, state);
    st.met = Some(state <= 1024.0);
    st.note = format!(
        "without the audit streams ({:.0} B/lease); target ≤ 1024 B; one task: {}",
        audit as f64 / n_f,
        per_key.join(", ")
    );
    report.rows.push(st);
    cleanup(url, &prefix).await;
    Ok(())
}
