//! `leash doctor`: checks a live broker and prints each check with its result.
//!
//! Two parts: the broker-side checks of `Admin.Diagnose` (as an admin: the
//! store's persistence and eviction policy, clock skew between the broker and
//! the store, trust bundle expiry, signing key age, and the canary loop's last
//! run when it is on), then one revocation probe run from here (see
//! [`crate::canary::probe`]) as the canary's SVID. Every line reads
//! `PASS|WARN|FAIL <name>: <detail> (<figure>)`; the probe's figures follow
//! it. The exit status is 0 unless a check failed (warnings pass), 1 then.
//!
//! Defaults point at `leash dev`: `admin.pem` for Diagnose and `canary.pem`
//! for the probe, both in the dev directory.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use leash_proto::v1::{self as pb, admin_client::AdminClient};

use super::ConnectArgs;
use crate::{
    canary::{self, ProbeTarget, RunResult},
    doctor::{CheckStatus, format_ms},
};

/// The file stem of the dev directory's canary SVID (`canary.pem`,
/// `canary-key.pem`; see [`super::dev::CANARY`]).
pub const CANARY_ROLE: &str = "canary";

/// Options of `leash doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Connection for Admin.Diagnose (defaults to the dev admin SVID).
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The SVID the probe runs as [default: <dev-dir>/canary.pem].
    #[arg(long, env = "LEASH_CANARY_CERT")]
    pub canary_cert: Option<PathBuf>,
    /// Its private key [default: <dev-dir>/canary-key.pem].
    #[arg(long, env = "LEASH_CANARY_KEY")]
    pub canary_key: Option<PathBuf>,
    /// The canary template the probe begins a task on.
    #[arg(long, default_value = "leash-canary")]
    pub template: String,
    /// How soon after completion the revocation must be seen for the probe to pass.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub slo: Duration,
    /// Run only the broker-side checks, not the probe.
    #[arg(long)]
    pub no_probe: bool,
}

fn line(status: CheckStatus, name: &str, detail: &str, figure: &str) -> String {
    if figure.is_empty() {
        format!("{} {name}: {detail}", status.as_str())
    } else {
        format!("{} {name}: {detail} ({figure})", status.as_str())
    }
}

/// Runs `leash doctor` and prints its lines to stdout.
pub async fn execute(args: DoctorArgs) -> ExitCode {
    let mut failed = 0usize;
    let mut warned = 0usize;
    let mut passed = 0usize;
    let mut count = |status: CheckStatus| match status {
        CheckStatus::Pass => passed += 1,
        CheckStatus::Warn => warned += 1,
        CheckStatus::Fail => failed += 1,
    };
    println!("leash doctor: {}", args.connect.broker);

    match diagnose(&args.connect).await {
        Ok(checks) => {
            for c in &checks {
                let status = match (c.passed, c.warning) {
                    (false, _) => CheckStatus::Fail,
                    (true, true) => CheckStatus::Warn,
                    (true, false) => CheckStatus::Pass,
                };
                count(status);
                println!("{}", line(status, &c.name, &c.detail, &c.figure));
            }
        }
        Err(e) => {
            count(CheckStatus::Fail);
            println!("{}", line(CheckStatus::Fail, "diagnose", &e, ""));
        }
    }

    if !args.no_probe {
        let (ca, _, _) = args.connect.files(super::admin::ROLE);
        let dir = &args.connect.dev_dir;
        let target = ProbeTarget {
            broker: args.connect.broker.clone(),
            ca,
            cert: args
                .canary_cert
                .clone()
                .unwrap_or_else(|| dir.join(format!("{CANARY_ROLE}.pem"))),
            key: args
                .canary_key
                .clone()
                .unwrap_or_else(|| dir.join(format!("{CANARY_ROLE}-key.pem"))),
            template: args.template.clone(),
            wait: canary::REVOCATION_WAIT.max(args.slo),
        };
        let run = canary::judge(canary::probe(&target).await, args.slo, 0);
        let slo = humantime::format_duration(args.slo);
        match (&run.result, &run.report) {
            (RunResult::Pass | RunResult::Slow, Some(r)) => {
                let (status, verdict) = if run.result == RunResult::Pass {
                    (CheckStatus::Pass, "within")
                } else {
                    (CheckStatus::Fail, "over")
                };
                count(status);
                println!(
                    "{}",
                    line(
                        status,
                        "revocation probe",
                        &format!(
                            "task {} on template {}: revoked for Introspect and a Verifier {verdict} the SLO of {slo}",
                            r.task_id, args.template
                        ),
                        &format_ms(r.revocation),
                    )
                );
                println!("     begin task          {}", format_ms(r.begin));
                println!("     complete task       {}", format_ms(r.complete));
                println!(
                    "     introspect inactive {} after completion",
                    format_ms(r.introspect_lag)
                );
                println!(
                    "     verifier rejects    {} after completion",
                    format_ms(r.verifier_lag)
                );
            }
            _ => {
                count(CheckStatus::Fail);
                println!(
                    "{}",
                    line(
                        CheckStatus::Fail,
                        "revocation probe",
                        &format!(
                            "as {}: {}",
                            target.cert.display(),
                            run.error.as_deref().unwrap_or("no report")
                        ),
                        "",
                    )
                );
            }
        }
    }

    println!("{passed} passed, {warned} warned, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn diagnose(connect: &ConnectArgs) -> Result<Vec<pb::DiagnosticCheck>, String> {
    let channel = connect
        .connect(super::admin::ROLE)
        .await
        .map_err(|e| e.to_string())?;
    AdminClient::new(channel)
        .diagnose(pb::DiagnoseRequest {})
        .await
        .map(|r| r.into_inner().checks)
        .map_err(|s| {
            format!(
                "Admin.Diagnose: {}: {}",
                super::admin::code_name(s.code()),
                s.message()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_the_figure_only_when_there_is_one() {
        assert_eq!(
            line(
                CheckStatus::Fail,
                "store eviction",
                "set noeviction",
                "allkeys-lru"
            ),
            "FAIL store eviction: set noeviction (allkeys-lru)"
        );
        assert_eq!(
            line(CheckStatus::Warn, "store persistence", "not persisted", ""),
            "WARN store persistence: not persisted"
        );
    }
}
