//! `--mode verify`: the SDK's offline verification of a live JWT on one core,
//! against raw `ring` verifying the same signature on one core.

use std::time::{Duration, Instant};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_proto::v1::{self as pb, verifier_client::VerifierClient};
use leash_sdk::verifier::{KeySet, Verifier, VerifierConfig};

use super::{CommandError, Ctx, Report, Row, live_token, per_second};

/// Runs `f` on one blocking thread until `d` has passed (at most 10 M times);
/// returns calls per second and whether every call succeeded.
pub(super) async fn one_core<F>(d: Duration, mut f: F) -> (f64, bool)
where
    F: FnMut() -> bool + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut n = 0usize;
        let mut all_ok = true;
        while n < 10_000_000 && (!n.is_multiple_of(64) || start.elapsed() < d) {
            all_ok &= f();
            n += 1;
        }
        (per_second(n, start.elapsed()), all_ok)
    })
    .await
    .unwrap_or((0.0, false))
}

fn bench_err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> CommandError + '_ {
    move |e| CommandError::Bench(format!("{what}: {e}"))
}

pub(super) async fn measure(ctx: &Ctx, report: &mut Report) -> Result<(), CommandError> {
    let token = live_token(ctx, pb::CredentialKind::Jwt).await?;
    let mut verifier_client = VerifierClient::new(ctx.args.connect.connect("resource").await?);
    let jwks = verifier_client
        .get_jwks(pb::GetJwksRequest {})
        .await?
        .into_inner()
        .jwks_json;
    let keys = KeySet::from_jwks(&jwks).map_err(bench_err("JWKS"))?;
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, sig] = parts[..] else {
        return Err(CommandError::Bench("the JWT is not a compact JWS".into()));
    };
    let claims: serde_json::Value = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(bench_err("JWT payload"))?;
    let text = |k: &str| claims[k].as_str().unwrap_or_default().to_owned();
    let mut config = VerifierConfig::new(text("aud"), text("iss"));
    config.fail_closed_after = None;
    let verifier = Verifier::offline(keys, config);
    let (_, cert, _) = ctx.args.connect.files("agent");
    let leaf = std::fs::read(&cert)
        .map_err(|e| e.to_string())
        .and_then(|pem| {
            use rustls::pki_types::{CertificateDer, pem::PemObject as _};
            CertificateDer::from_pem_slice(&pem)
                .map(|c| c.as_ref().to_vec())
                .map_err(|e| e.to_string())
        })
        .map_err(bench_err("agent SVID"))?;
    // Checked once outside the loop, so the loop measures a success path.
    verifier
        .verify(&token, None, Some(&leaf))
        .map_err(|e| CommandError::Bench(format!("the SDK refused the bench JWT: {e}")))?;
    let d = ctx.args.duration.min(Duration::from_secs(5));
    let (sdk, sdk_ok) = {
        let (token, verifier, leaf) = (token.clone(), verifier.clone(), leaf.clone());
        one_core(d, move || {
            verifier.verify(&token, None, Some(&leaf)).is_ok()
        })
        .await
    };
    let jwk: serde_json::Value = serde_json::from_str(&jwks).map_err(bench_err("JWKS"))?;
    let x = jwk["keys"][0]["x"].as_str().unwrap_or_default();
    let public = URL_SAFE_NO_PAD.decode(x).map_err(bench_err("JWK x"))?;
    let signature = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(bench_err("JWT signature"))?;
    let input = format!("{header}.{payload}").into_bytes();
    let (raw, raw_ok) = one_core(d, move || {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
            .verify(&input, &signature)
            .is_ok()
    })
    .await;
    let mut ring_row = Row::new("ring Ed25519 verify (1 core)", 1, raw);
    if !raw_ok {
        ring_row.note = "some verifications failed".into();
    }
    let mut sdk_row = Row::new("SDK offline verify (1 core)", 1, sdk);
    sdk_row.against("ring Ed25519 verify", raw, Some(0.8));
    if !sdk_ok {
        sdk_row.note = "some verifications failed".into();
    }
    report.rows.push(ring_row);
    report.rows.push(sdk_row);
    Ok(())
}
