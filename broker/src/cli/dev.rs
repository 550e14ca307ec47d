//! `leash dev`: the whole product on one machine, no Redis needed.
//!
//! Writes a throwaway CA, a broker certificate, sample SVIDs (see [`SVIDS`]:
//! an agent, a subagent, a resource server, an admin and the revocation
//! canary), a signing key, sample templates (and `leash-canary`, which
//! `leash doctor` probes with) and a config into a directory, prints the commands to try next, and serves with the in-memory
//! store (or Redis with `--redis`). Every run makes a fresh CA: nothing written
//! here is meant to outlive the session. The CA key is never written to disk.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;

use crate::{
    config::{Config, ConfigError},
    credentials::{Algorithm, SigningKey},
    identity::{SpiffeId, pki::DevCa},
};

/// Options of `leash dev`.
#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Directory for the generated files (replaced on every run).
    #[arg(long, default_value = super::DEV_DIR)]
    pub dir: PathBuf,
    /// mTLS address for agents and resource servers.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub agent_addr: SocketAddr,
    /// Plaintext ops address (health).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub ops_addr: SocketAddr,
    /// OAuth 2.0 address (RFC 8414 metadata, token exchange, introspection,
    /// revocation; docs/mcp.md).
    #[arg(long, default_value = "127.0.0.1:8444")]
    pub oauth_addr: SocketAddr,
    /// Use this Redis instead of the in-memory store, e.g. redis://127.0.0.1:6379/0.
    #[arg(long)]
    pub redis: Option<String>,
    /// Trust domain of the generated SVIDs.
    #[arg(long, default_value = "leash.dev")]
    pub trust_domain: String,
    /// Decide every BeginTask with the Cedar policies in this directory too
    /// (`[policy] dir`; e.g. examples/policies). Default: template rules only.
    #[arg(long)]
    pub policies: Option<PathBuf>,
}

/// Why the dev environment could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate or key generation failed.
    #[error("generating credentials: {0}")]
    Generate(String),
    /// The generated config did not validate (a bug).
    #[error("generated config is invalid:\n{0}")]
    Config(#[from] ConfigError),
}

/// One sample SVID `leash dev` writes: `<file>.pem` and `<file>-key.pem`,
/// for `spiffe://<trust domain>/<path>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevSvid {
    /// The file stem in the dev directory; also the client role that picks it
    /// by default ([`super::ConnectArgs::files`]).
    pub file: &'static str,
    /// The SPIFFE ID path under the trust domain.
    pub path: &'static str,
}

/// The agent: the default SVID of `leash task ...` (class `agent`).
pub const AGENT: DevSvid = DevSvid {
    file: "agent",
    path: "agent/demo",
};
/// A subagent, for delegated tasks (class `subagent`, same tenant as the
/// agent; the demo template allows it). Pick it with `--cert`/`--key`.
pub const SUBAGENT: DevSvid = DevSvid {
    file: "subagent",
    path: "subagent/demo",
};
/// The resource server: the default SVID of `leash token ...` and `leash jwks`.
pub const RESOURCE: DevSvid = DevSvid {
    file: "resource",
    path: "resource/demo",
};
/// The operator: the default SVID of `leash admin ...`, the one `[admin]
/// callers` entry, and the only member of class `admins` (so a template's
/// `approval: { approvers: { classes: [admins] } }` makes it the approver).
pub const ADMIN: DevSvid = DevSvid {
    file: "admin",
    path: "admin/demo",
};
/// The revocation canary: the probe of `leash doctor` runs as it (class
/// `canary`, allowed by the `leash-canary` template, and a verifier caller of
/// that template's audience only).
pub const CANARY: DevSvid = DevSvid {
    file: "canary",
    path: "canary/leash",
};
/// Every sample SVID, in the order they are written.
pub const SVIDS: [DevSvid; 5] = [AGENT, SUBAGENT, RESOURCE, ADMIN, CANARY];

/// The audience of the canary template's one grant: no real resource server.
pub const CANARY_AUDIENCE: &str = "https://canary.leash.invalid";

/// The reserved template of the revocation canary (`[canary] template`, and
/// `leash doctor --template`): one short-lived JWT that opens nothing.
pub const CANARY_TEMPLATE: &str = r#"# The revocation canary's template, written by `leash dev`.
# `leash doctor` (and the broker's own loop with [canary] enabled = true) begins
# a task on it, checks the credential, completes the task and measures how long
# until Introspect and a Verifier refuse the credential. It grants nothing usable.
name: leash-canary
version: "1"
owner: platform-team@example.com
description: Reserved for the revocation canary; opens nothing.
identities:
  - spiffe://{td}/canary/*
lease:
  ttl: 30s
  max_ttl: 1m
  max_lifetime: 5m
grants:
  - name: probe
    kind: jwt
    audience: {audience}
    scopes:
      - { scope: "canary:probe", class: read }
    ttl: 30s
"#;

/// The sample template `leash dev` writes.
pub const DEMO_TEMPLATE: &str = r#"# A sample task-scope template written by `leash dev`.
# Reference: docs/templates.md
name: demo
version: "1"
owner: platform-team@example.com
description: Read one repository and post one review comment.
identities:
  - spiffe://{td}/agent/*
  - spiffe://{td}/subagent/*     # subagents that are handed a delegated task
parameters:
  repo:
    type: string
    pattern: "[a-z0-9-]+/[a-z0-9-]+"
    required: true
lease:
  ttl: 60s
  max_ttl: 5m
  max_lifetime: 1h
delegation:                        # `leash task delegate` hands a narrower child task
  max_depth: 2
  may_act: [spiffe://{td}/subagent/*]
grants:
  - name: github
    kind: jwt
    audience: https://api.github.example
    scopes:
      - { scope: "repo:{repo}:read", class: read }       # read | write | destructive
      - { scope: "pulls:{repo}:comment", class: write }
    ttl: 60s
  - name: db
    kind: opaque
    audience: postgres://db.example/app
    scopes: [{ scope: "db:app:select", class: read }]
    ttl: 30s
"#;

/// The MCP example's template (examples/mcp): one JWT for the example tool
/// server, a read scope and a write scope.
pub const MCP_TEMPLATE: &str = r#"# The MCP example's template, written by `leash dev` (examples/mcp).
# Reference: docs/templates.md, docs/mcp.md
name: mcp-demo
version: "1"
owner: platform-team@example.com
description: List and add items through the example MCP tool server.
identities:
  - spiffe://{td}/agent/*
lease:
  ttl: 60s
  max_ttl: 5m
  max_lifetime: 1h
grants:
  - name: tools
    kind: jwt
    audience: {mcp_resource}      # the MCP server's resource URL (RFC 8707, RFC 9728)
    scopes:
      - { scope: "tools:read", class: read }
      - { scope: "tools:write", class: write }
    ttl: 60s
"#;

/// The resource URL of the MCP example's tool server (examples/mcp).
pub const MCP_RESOURCE: &str = "https://localhost:9443/mcp";

/// The second sample template: a deploy whose `deploy` grant waits for an
/// admin's yes (`leash admin approve`), while the read grant is issued at once.
pub const DEPLOY_TEMPLATE: &str = r#"# A sample gated template written by `leash dev`.
# Reference: docs/templates.md
name: demo-deploy
version: "1"
owner: platform-team@example.com
description: Deploy one repository to staging, after an admin approves.
identities:
  - spiffe://{td}/agent/*
parameters:
  repo:
    type: string
    pattern: "[a-z0-9-]+/[a-z0-9-]+"
    required: true
lease:
  ttl: 60s
  max_ttl: 5m
  max_lifetime: 1h
  min_renew_interval: 0s           # so the walkthrough can renew right after approving
approval:
  grants: [deploy]                 # withheld until approved
  approvers: { classes: [admins] } # admin.pem; never the task's own owner
  validity: 15m                    # pending this long at most, then expired
  while_pending: issue_others      # the github grant is issued at once
grants:
  - name: github
    kind: jwt
    audience: https://api.github.example
    scopes:
      - { scope: "repo:{repo}:read", class: read }
    ttl: 60s
  - name: deploy
    kind: jwt
    audience: https://deploy.example
    scopes:
      - { scope: "deploy:{repo}:staging", class: write }
    ttl: 60s
"#;

/// The template `leash bench` declares: the demo's grants, with the renewal
/// limit off, because the bench renews right after it begins.
pub fn bench_template() -> String {
    DEMO_TEMPLATE
        .replace(
            "# A sample task-scope template written by `leash dev`.",
            "# Written by `leash dev` for `leash bench`, which renews right after each\n\
             # begin. Real templates keep the default renewal limit (min_renew_interval).",
        )
        .replace("name: demo", "name: bench")
        .replace(
            "description: Read one repository and post one review comment.",
            "description: Load generation only.",
        )
        .replace(
            "  max_lifetime: 1h\n",
            "  max_lifetime: 1h\n  min_renew_interval: 0s\n",
        )
}

/// The template `leash bench --template bench-jwt` declares: the bench
/// template with its one JWT grant only (issue 10's BeginTask target).
pub fn bench_jwt_template() -> String {
    let bench = bench_template().replace("name: bench", "name: bench-jwt");
    match bench.split_once("  - name: db\n") {
        Some((head, _)) => head.to_owned(),
        None => bench,
    }
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<(), DevError> {
    let path = dir.join(name);
    let err = |source| DevError::Write {
        path: path.clone(),
        source,
    };
    fs::write(&path, contents).map_err(err)?;
    if secret {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

/// Writes the dev files into `args.dir` and returns the config to serve.
///
/// # Errors
/// [`DevError`] if a file cannot be written or generation fails.
pub fn prepare(args: &DevArgs) -> Result<Config, DevError> {
    let gen_err = |e: &dyn std::fmt::Display| DevError::Generate(e.to_string());
    let dir = &args.dir;
    let mkdir = |p: &Path| {
        fs::create_dir_all(p).map_err(|source| DevError::Write {
            path: p.to_owned(),
            source,
        })
    };
    mkdir(dir)?;
    mkdir(&dir.join("templates"))?;
    let td = &args.trust_domain;
    let day = Duration::from_secs(24 * 3600);
    let ca = DevCa::generate(td, day).map_err(|e| gen_err(&e))?;
    let server = ca.issue_server_cert(day).map_err(|e| gen_err(&e))?;
    let svid = |path: &str| {
        let id = SpiffeId::parse(&format!("spiffe://{td}/{path}")).map_err(|e| gen_err(&e))?;
        ca.issue_svid(&id, day).map_err(|e| gen_err(&e))
    };
    let (_, signing_pem) =
        SigningKey::generate("dev-1", Algorithm::EdDSA).map_err(|e| gen_err(&e))?;

    write(dir, "bundle.pem", ca.cert_pem(), false)?;
    write(dir, "broker.pem", &server.cert_pem, false)?;
    write(dir, "broker-key.pem", &server.key_pem, true)?;
    for s in SVIDS {
        let issued = svid(s.path)?;
        write(dir, &format!("{}.pem", s.file), &issued.cert_pem, false)?;
        write(dir, &format!("{}-key.pem", s.file), &issued.key_pem, true)?;
    }
    write(dir, "signing-key.pem", &signing_pem, true)?;
    write(
        &dir.join("templates"),
        "demo.yaml",
        &DEMO_TEMPLATE.replace("{td}", td),
        false,
    )?;
    write(
        &dir.join("templates"),
        "demo-deploy.yaml",
        &DEPLOY_TEMPLATE.replace("{td}", td),
        false,
    )?;
    write(
        &dir.join("templates"),
        "mcp-demo.yaml",
        &MCP_TEMPLATE
            .replace("{td}", td)
            .replace("{mcp_resource}", MCP_RESOURCE),
        false,
    )?;
    write(
        &dir.join("templates"),
        "bench.yaml",
        &bench_template().replace("{td}", td),
        false,
    )?;
    write(
        &dir.join("templates"),
        "bench-jwt.yaml",
        &bench_jwt_template().replace("{td}", td),
        false,
    )?;
    write(
        &dir.join("templates"),
        "leash-canary.yaml",
        &CANARY_TEMPLATE
            .replace("{td}", td)
            .replace("{audience}", CANARY_AUDIENCE),
        false,
    )?;

    let (kind, url) = match &args.redis {
        Some(url) => ("redis", url.as_str()),
        None => ("memory", "redis://127.0.0.1:6379/0"),
    };
    let toml = format!(
        r#"# Written by `leash dev`; see examples/leash.toml for every option.
[listen]
agent = "{agent_addr}"
ops = "{ops_addr}"

[tls]
cert = "broker.pem"
key = "broker-key.pem"
bundles = {{ "{td}" = "bundle.pem" }}

[templates]
dir = "templates"
{policy}
[signing]
# The issuer is the OAuth listener's URL below, as RFC 8414 clients expect.
issuer = "{oauth_url}"

keys = [{{ kid = "dev-1", alg = "EdDSA", path = "signing-key.pem" }}]

# The OAuth 2.0 front door (docs/mcp.md): metadata at
# {oauth_url}/.well-known/oauth-authorization-server, token exchange,
# introspection and revocation with the SVIDs of this directory.
[oauth]
listen = "{oauth_addr}"
public_url = "{oauth_url}"

[store]
kind = "{kind}"
url = "{url}"
prefix = "leash-dev"
# A development Redis rarely persists every write; production keeps the default
# "fsync" or uses "replicas = N" (see examples/leash.toml).
durability = "none"

[verifier]
# Who may introspect and watch revocations, and of which audiences' credentials
# (the first entry matching the caller decides; ["*"] means every audience).
callers = [
  {{ identity = "spiffe://{td}/resource/*", audiences = ["https://api.github.example", "postgres://db.example/app", "https://deploy.example", "{mcp_resource}"] }},
  # The revocation canary checks its own credential (canary.pem).
  {{ identity = "spiffe://{td}/{canary}", audiences = ["{canary_audience}"] }},
]

# Who may call the Admin service (inventory, kill switches): the dev admin
# SVID, admin.pem, the default of `leash admin ...`.
[admin]
callers = ["spiffe://{td}/{admin}"]

# Who is which actor class, of which tenant (first match wins; an identity no
# class matches is denied). The dev identities are all of tenant "default",
# the tenant of templates without `tenant:`.
[[actors.classes]]
name = "agent"
tenant = "default"
owner = "you@localhost"
identities = ["spiffe://{td}/agent/*"]

# Subagents: handed delegated tasks by agents (subagent.pem).
[[actors.classes]]
name = "subagent"
tenant = "default"
owner = "you@localhost"
identities = ["spiffe://{td}/subagent/*"]

# Operators and approvers (admin.pem): a template's approval gate may name
# `approvers: {{ classes: [admins] }}`.
[[actors.classes]]
name = "admins"
tenant = "default"
owner = "you@localhost"
identities = ["spiffe://{td}/admin/*"]

# The revocation canary (canary.pem): `leash doctor` probes as it.
[[actors.classes]]
name = "canary"
tenant = "default"
owner = "you@localhost"
identities = ["spiffe://{td}/{canary}"]

[[actors.classes]]
name = "service"
tenant = "default"
owner = "you@localhost"
identities = ["spiffe://{td}/*"]

# The revocation canary loop (off here; `leash doctor` runs one probe itself).
# [canary]
# enabled = true
# interval = "30s"
# slo = "2s"
# template = "leash-canary"
# cert = "canary.pem"
# key = "canary-key.pem"
"#,
        canary = CANARY.path,
        canary_audience = CANARY_AUDIENCE,
        mcp_resource = MCP_RESOURCE,
        oauth_addr = args.oauth_addr,
        oauth_url = oauth_url(args),
        agent_addr = args.agent_addr,
        admin = ADMIN.path,
        ops_addr = args.ops_addr,
        policy = match &args.policies {
            // Absolute, so the config in the dev directory finds it.
            Some(p) => format!(
                "\n[policy]\ndir = {:?}\n",
                std::path::absolute(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string()
            ),
            None => String::new(),
        },
    );
    write(dir, "leash.toml", &toml, false)?;
    Ok(Config::from_toml(&toml, std::iter::empty(), dir)?)
}

/// The base URL of the dev OAuth listener (the dev certificate names localhost).
fn oauth_url(args: &DevArgs) -> String {
    if args.oauth_addr.ip().is_loopback() {
        format!("https://localhost:{}", args.oauth_addr.port())
    } else {
        format!("https://{}", args.oauth_addr)
    }
}

/// What to print once the dev broker listens; `program` is how the user ran `leash`.
pub fn next_steps(args: &DevArgs, program: &str) -> String {
    let dir = args.dir.display();
    let broker = if args.agent_addr.ip().is_loopback() {
        format!("https://localhost:{}", args.agent_addr.port())
    } else {
        format!("https://{}", args.agent_addr)
    };
    let env = if args.dir == Path::new(super::DEV_DIR) && broker == "https://localhost:8443" {
        String::new()
    } else {
        format!("export LEASH_DEV_DIR={dir} LEASH_BROKER={broker}\n  ")
    };
    let td = &args.trust_domain;
    let svids = SVIDS
        .iter()
        .map(|s| {
            format!(
                "  {:<14} spiffe://{td}/{}\n",
                format!("{}.pem", s.file),
                s.path
            )
        })
        .collect::<String>();
    format!(
        "\nleash dev is serving on {broker} (ops/health on http://{ops}).\n\
         Files are in {dir}/: a throwaway CA (bundle.pem) and these SVIDs (each with its -key.pem):\n\
         {svids}\n\
         In another terminal, try:\n\n  \
         {env}{program} task begin --template demo --param repo=acme/widgets --intent \"review PR 42\"\n  \
         {program} token introspect '<value of a credential printed above>'\n  \
         {program} admin tasks                              # as the admin, admin.pem\n  \
         {program} task complete <task_id printed above>\n  \
         {program} token introspect '<the same value>'      # now {{\"active\": false}}\n\n\
         Delegate and approve (see README \"Delegation\" and \"Approvals\"):\n\n  \
         {program} task delegate <task_id> --to spiffe://{td}/subagent/demo --grant github --intent \"read the diff\"\n  \
         {program} task redeem <child task_id> --cert {dir}/subagent.pem --key {dir}/subagent-key.pem  # LEASH_DELEGATION_HANDLE=<handle>\n  \
         {program} task begin --template demo-deploy --param repo=acme/widgets --intent \"deploy\"  # waits for approval\n  \
         {program} admin approve <task_id> --reason \"...\"\n\n\
         OAuth 2.0 (token exchange, introspection; docs/mcp.md) and the MCP example (examples/mcp):\n\n  \
         curl --cacert {dir}/bundle.pem {oauth}/.well-known/oauth-authorization-server\n\n\
         Check the broker (store, clocks, bundles, keys, and a revocation probe as canary.pem):\n\n  \
         {program} doctor\n\n\
         Act as the subagent with --cert {dir}/subagent.pem --key {dir}/subagent-key.pem.\n\
         Press Ctrl-C to stop.\n",
        ops = args.ops_addr,
        oauth = oauth_url(args),
    )
}

#[cfg(test)]
mod tests {
    use super::{
        CANARY_AUDIENCE, CANARY_TEMPLATE, DEMO_TEMPLATE, DEPLOY_TEMPLATE, MCP_RESOURCE,
        MCP_TEMPLATE, bench_template,
    };

    #[test]
    fn the_sample_templates_parse_with_delegation_and_approval() {
        for (name, src) in [
            ("demo", DEMO_TEMPLATE),
            ("demo-deploy", DEPLOY_TEMPLATE),
            ("leash-canary", CANARY_TEMPLATE),
            ("mcp-demo", MCP_TEMPLATE),
        ] {
            let src = src
                .replace("{td}", "leash.dev")
                .replace("{audience}", CANARY_AUDIENCE)
                .replace("{mcp_resource}", MCP_RESOURCE);
            let parsed = crate::templates::parse_str(std::path::Path::new(name), &src);
            assert!(parsed.is_ok(), "{name}: {:?}", parsed.err());
        }
    }

    #[test]
    fn the_bench_template_is_the_demo_with_renewal_limit_off() {
        let bench = bench_template();
        for changed in [
            "name: bench",
            "min_renew_interval: 0s",
            "description: Load generation only.",
            "# Written by `leash dev` for `leash bench`",
        ] {
            assert!(bench.contains(changed), "missing {changed:?} in:\n{bench}");
        }
        let grants = |t: &str| t.split_once("grants:").map(|(_, g)| g.to_owned());
        assert_eq!(grants(&bench), grants(DEMO_TEMPLATE), "the same grants");
    }
}
