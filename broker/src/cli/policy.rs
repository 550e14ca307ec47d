//! `leash policy check DIR` and `leash policy explain`: validate Cedar policies,
//! and show how the broker would decide one BeginTask without issuing anything
//! (no store, no listener: only templates and policies are loaded).

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, Subcommand};

use crate::{
    config::Config,
    identity::{Identity, SpiffeId},
    policy::{self, cedar},
    templates::{self, DEFAULT_TENANT},
};

/// Policy subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate every *.cedar file in DIR against the Leash schema; print every
    /// problem as file:line:col.
    Check {
        /// Directory of *.cedar policies.
        dir: PathBuf,
        /// IANA time zone to check `[policy] time_zone` with.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
    },
    /// Decide one BeginTask as the broker would and say why, issuing nothing.
    Explain(Box<ExplainArgs>),
}

/// What `leash policy explain` decides.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// Take the template directory, policy directory and time zone from this config.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Template directory (overrides the config's).
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Policy directory (overrides the config's).
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// IANA time zone of `context.time` (overrides the config's; default UTC).
    #[arg(long)]
    pub time_zone: Option<String>,
    /// The caller's SPIFFE ID.
    #[arg(long)]
    pub identity: String,
    /// The caller's actor class, when no `--config` classifies it.
    #[arg(long)]
    pub class: Option<String>,
    /// The caller's tenant, with `--class` (default `default`).
    #[arg(long)]
    pub tenant: Option<String>,
    /// How the caller authenticates: `mtls` or `jwt_svid`.
    #[arg(long, default_value = "mtls")]
    pub connection: String,
    /// Template name.
    #[arg(long)]
    pub template: String,
    /// Parameter as name=value (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Requested lease TTL, e.g. `30s` (default: the template's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// When, RFC 3339 (e.g. `2026-12-07T10:30:00Z`); default now.
    #[arg(long)]
    pub at: Option<String>,
}

/// Exit status of `explain` for a denied request (0 is allowed).
pub const EXIT_DENIED: u8 = 2;

/// Runs `leash policy check`: every problem, or a one-line summary.
///
/// # Errors
/// Every problem in the directory.
pub fn check(dir: &std::path::Path, zone: &str) -> Result<String, cedar::PolicyErrors> {
    let policies = cedar::load_dir(dir, zone)?;
    Ok(format!(
        "{}: {} policy(ies) OK against the Leash schema",
        dir.display(),
        policies.len()
    ))
}

/// The result of `leash policy explain`: the report, and whether it allowed.
#[derive(Debug)]
pub struct Explanation {
    /// Whether the broker would issue the task.
    pub allowed: bool,
    /// The report for people.
    pub report: String,
}

/// A denial decided before any policy was evaluated, and why.
fn denied_before_policies(why: &str) -> Explanation {
    Explanation {
        allowed: false,
        report: format!("decision: DENY\n{why}\npolicies: not reached\n"),
    }
}

/// Runs `leash policy explain`.
///
/// # Errors
/// A message for a bad config, template or policy directory, identity, time or
/// parameter.
pub fn explain(args: &ExplainArgs) -> Result<Explanation, String> {
    let config = match &args.config {
        Some(path) => Some(Config::load(path).map_err(|e| format!("{}:\n{e}", path.display()))?),
        None => None,
    };
    let template_dir = args
        .templates
        .clone()
        .or_else(|| config.as_ref().map(|c| c.templates.dir.clone()))
        .ok_or("give --templates DIR or --config FILE")?;
    let policy_dir = args
        .policies
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.policy.dir.clone()));
    let zone = args
        .time_zone
        .clone()
        .or_else(|| config.as_ref().map(|c| c.policy.time_zone.clone()))
        .unwrap_or_else(|| "UTC".into());
    let templates = templates::check_dir(&template_dir).map_err(|e| e.to_string())?;
    let policies = match &policy_dir {
        Some(dir) => Some(cedar::load_dir(dir, &zone).map_err(|e| e.to_string())?),
        None => None,
    };
    let spiffe_id = SpiffeId::parse(&args.identity).map_err(|e| format!("--identity: {e}"))?;
    let mtls = match args.connection.as_str() {
        "mtls" => true,
        "jwt_svid" => false,
        other => return Err(format!("--connection: {other:?}; use mtls or jwt_svid")),
    };
    let caller = Identity {
        spiffe_id,
        svid_not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
        // A stand-in certificate: only whether there is one matters to policies.
        thumbprint_s256: mtls.then_some([0; 32]),
        spki_s256: mtls.then_some([0; 32]),
    };
    let now_ms = match &args.at {
        Some(at) => {
            let ts = jiff::Timestamp::from_str(at).map_err(|e| format!("--at {at:?}: {e}"))?;
            u64::try_from(ts.as_millisecond()).map_err(|_| "--at: before 1970".to_owned())?
        }
        None => crate::clock::duration_ms(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        ),
    };
    let mut parameters = BTreeMap::new();
    for p in &args.params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("--param {p:?}: expected NAME=VALUE"))?;
        parameters.insert(k.to_owned(), v.to_owned());
    }

    let mut out = String::new();
    let decision = match policy::decide(
        &templates,
        &caller.spiffe_id,
        &args.template,
        &parameters,
        args.ttl,
        now_ms,
    ) {
        Ok(d) => d,
        Err(e) => {
            let why = match &e {
                policy::PolicyError::Invalid(ps) => ps
                    .iter()
                    .map(|p| format!("{}: {}", p.field, p.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
                other => other.to_string(),
            };
            return Ok(denied_before_policies(&format!(
                "template rules: refused: {why}"
            )));
        }
    };
    let (class, tenant) = match (&config, &args.class) {
        // An explicit class wins, so a platform team can try a class before
        // mapping identities to it.
        (_, Some(class)) => (
            class.clone(),
            args.tenant
                .clone()
                .unwrap_or_else(|| DEFAULT_TENANT.to_owned()),
        ),
        (Some(config), None) => match config.actor_classes().classify(&caller.spiffe_id) {
            Ok(actor) => (actor.class.clone(), actor.tenant.clone()),
            Err(e) => return Ok(denied_before_policies(&format!("actor classes: {e}"))),
        },
        (None, None) => {
            return Err(
                "give --config FILE (its actor classes classify the identity) or --class NAME [--tenant NAME]"
                    .to_owned(),
            );
        }
    };
    if !decision.template.admits_class(&class, &tenant) {
        let classes = if decision.template.classes.is_empty() {
            "any of its tenant".to_owned()
        } else {
            decision.template.classes.join(", ")
        };
        return Ok(denied_before_policies(&format!(
            "template rules: class {class:?} of tenant {tenant:?} may not use template {:?} (tenant {:?}, classes: {classes})",
            decision.template.name, decision.template.tenant,
        )));
    }
    let request = policy::policy_request(&caller, &class, &tenant, &decision, now_ms);
    let _ = writeln!(
        out,
        "template rules: accepted ({} v{}, sensitivity {})",
        decision.template.name,
        decision.template.version,
        decision.template.sensitivity.as_str()
    );
    let _ = writeln!(
        out,
        "request: identity {} ({}), class {class}, tenant {tenant}, ttl {}s",
        caller.spiffe_id,
        request.connection.as_str(),
        decision.lease_ttl_ms.div_ceil(1000)
    );
    for (grant, scopes) in &decision.grants {
        let list: Vec<String> = scopes
            .iter()
            .map(|(s, c)| format!("{s} ({})", c.as_str()))
            .collect();
        let _ = writeln!(out, "  grant {}: {}", grant.name, list.join(", "));
    }
    let allowed = match &policies {
        None => {
            let _ = writeln!(
                out,
                "policies: none configured: template rules alone decide"
            );
            true
        }
        Some(p) if p.is_empty() => {
            let _ = writeln!(
                out,
                "policies: no policy files: template rules alone decide"
            );
            true
        }
        Some(p) => {
            let _ = writeln!(
                out,
                "policies: {} loaded; time {} in {}",
                p.len(),
                jiff::Timestamp::from_millisecond(i64::try_from(now_ms).unwrap_or(i64::MAX))
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                p.time_zone()
            );
            let verdict = p.evaluate(&request).map_err(|e| e.to_string())?;
            let applied = p.applied(&request).map_err(|e| e.to_string())?;
            let describe = |id: &str| match p.origin(id) {
                Some(o) => format!(
                    "{id} ({} at {}:{}){}",
                    o.effect,
                    o.file.display(),
                    o.line,
                    o.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                None => id.to_owned(),
            };
            let _ = writeln!(out, "  applied (conditions matched):");
            if applied.is_empty() {
                let _ = writeln!(out, "    none");
            }
            for id in &applied {
                let _ = writeln!(out, "    {}", describe(id));
            }
            let _ = writeln!(out, "  determining:");
            if verdict.determining.is_empty() {
                let _ = writeln!(out, "    none: no permit applied (default deny)");
            }
            for id in &verdict.determining {
                let _ = writeln!(out, "    {}", describe(id));
            }
            for (id, error) in &verdict.errors {
                let _ = writeln!(out, "  failed to evaluate (denies): {id}: {error}");
            }
            if !verdict.allowed {
                let _ = writeln!(out, "  message: {}", p.denial_message(&verdict));
            }
            verdict.allowed
        }
    };
    let head = if allowed {
        "decision: ALLOW"
    } else {
        "decision: DENY"
    };
    Ok(Explanation {
        allowed,
        report: format!("{head}\n{out}"),
    })
}
