//! Offline verification throughput on one core: `cargo run --release -p leash-sdk --example verify_bench`.
//!
//! Signs a Leash-shaped JWT (EdDSA, and ES256) with the broker's own signing
//! code, then verifies it in a loop on a single thread for a fixed time and
//! prints verifications per second. A benchmark, not a test.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use leash_broker::credentials::{Algorithm, SigningKey, jwt};
use leash_sdk::verifier::{KeySet, Verifier, VerifierConfig};
use serde_json::{Value, json};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    for alg in [Algorithm::EdDSA, Algorithm::ES256] {
        let (key, _) = SigningKey::generate("bench", alg)?;
        let Value::Object(claims) = json!({
            "iss": "https://leash.bench", "aud": "https://api.bench", "sub": "spiffe://bench/agent/a",
            "scope": "repo:acme/widgets:read", "jti": "tk_0.c1", "task_id": "tk_0",
            "iat": now, "nbf": now, "exp": now + 600,
        }) else {
            return Err("claims".into());
        };
        let token = jwt::sign(&key, &claims)?;
        let keys = KeySet::from_jwks(&json!({ "keys": [key.jwk()] }).to_string())?;
        let verifier = Verifier::offline(
            keys,
            VerifierConfig {
                fail_closed_after: None,
                ..VerifierConfig::new("https://api.bench", "https://leash.bench")
            },
        );
        let run = Duration::from_secs(3);
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < run {
            for _ in 0..100 {
                verifier.verify(&token, Some("repo:acme/widgets:read"), None)?;
            }
            n += 100;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        println!(
            "{}: {rate:.0} verifications/s on one thread ({n} in {:.1}s)",
            alg.as_str(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
