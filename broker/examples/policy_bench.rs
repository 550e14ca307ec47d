//! Policy decision latency in process: the example policies plus generated ones,
//! 20 in all, decided for a BeginTask the template rules accepted. Prints p50,
//! p99 and max of `policy::authorize` (entities, context, Cedar evaluation).
//!
//! `cargo run --release -p leash-broker --example policy_bench [-- ITERATIONS]`
//!
//! A measurement, not a test: nothing asserts speed.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use leash_broker::{
    identity::{Identity, SpiffeId},
    policy::{self, cedar},
    templates,
};

/// Policies loaded in all: the examples plus generated ones up to this.
const POLICIES: usize = 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index of a bounded sample"
    )]
    let i = ((sorted.len().saturating_sub(1) as f64) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("ITERATIONS must be a number")?
        .unwrap_or(20_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let templates = templates::check_dir(&root.join("templates")).map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let mut count = 0;
    for entry in std::fs::read_dir(root.join("policies"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "cedar") {
            let name = path.file_name().context("file name")?;
            std::fs::copy(&path, dir.path().join(name))?;
            count += 1;
        }
    }
    // Realistic filler: forbids on other templates, identities, classes and
    // parameters, so every request evaluates all of them and none applies.
    for i in count..POLICIES {
        let text = match i % 4 {
            0 => format!(
                "@id(\"gen-{i}\")\nforbid (principal, action, resource == Leash::Template::\"other-{i}\");\n"
            ),
            1 => format!(
                "@id(\"gen-{i}\")\nforbid (principal, action, resource)\nwhen {{ context.identity like \"spiffe://blocked-{i}.test/*\" }};\n"
            ),
            2 => format!(
                "@id(\"gen-{i}\")\nforbid (principal, action, resource)\nwhen {{ context.parameters.contains({{name: \"repo\", value: \"frozen/repo-{i}\"}}) }};\n"
            ),
            _ => format!(
                "@id(\"gen-{i}\")\nforbid (principal in Leash::Class::\"quarantine-{i}\", action, resource)\nwhen {{ context.ttl_seconds > 0 }};\n"
            ),
        };
        std::fs::write(dir.path().join(format!("gen-{i:02}.cedar")), text)?;
    }
    let policies = cedar::load_dir(dir.path(), "Europe/Berlin").map_err(anyhow::Error::msg)?;
    let caller = Identity {
        spiffe_id: SpiffeId::parse("spiffe://acme.test/agent/reviewer")?,
        svid_not_after: SystemTime::now() + Duration::from_secs(3600),
        thumbprint_s256: Some([7; 32]),
        spki_s256: Some([7; 32]),
    };
    let parameters: BTreeMap<String, String> = [("repo", "acme/widgets"), ("pr", "42")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // Wednesday 10:00 in Berlin: the write scopes are inside the window, allowed.
    let now_ms = 1_796_806_800_000;
    let decision = policy::decide(
        &templates,
        &caller.spiffe_id,
        "github-pr-review",
        &parameters,
        None,
        now_ms,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    policy::authorize(&policies, &caller, "agent", "default", &decision, now_ms)
        .map_err(|e| anyhow::anyhow!("the bench request must be allowed: {e}"))?;

    for _ in 0..iterations / 10 {
        let _ = policy::authorize(&policies, &caller, "agent", "default", &decision, now_ms);
    }
    let mut samples = Vec::with_capacity(iterations);
    let started = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        let outcome = policy::authorize(&policies, &caller, "agent", "default", &decision, now_ms);
        samples.push(t.elapsed());
        std::hint::black_box(outcome).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let total = started.elapsed();
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "policy decision, {} policies loaded, {iterations} decisions (github-pr-review, 3 scopes):",
        policies.len()
    );
    println!(
        "  p50 {:.1} µs   p99 {:.1} µs   max {:.1} µs   ({:.0} decisions/s on one core)",
        us(percentile(&samples, 0.50)),
        us(percentile(&samples, 0.99)),
        us(samples.last().copied().unwrap_or_default()),
        f64::from(u32::try_from(iterations).unwrap_or(u32::MAX)) / total.as_secs_f64()
    );
    Ok(())
}
