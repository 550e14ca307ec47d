//! The `leash` command line: `serve`, `dev`, `templates check`, `policy check|explain`, the small client
//! (`task begin|renew|complete`, `token introspect`, `jwks`), the operator's
//! `admin ...`, `doctor` and `bench`.
//!
//! Client commands find their SVID, key and bundle from flags, then
//! `LEASH_CERT`/`LEASH_KEY`/`LEASH_CA`, then the `leash dev` directory, so the
//! README walk-through needs no flags at all. The dev directory holds one SVID
//! per role (see [`dev::SVIDS`]): `agent` for `task`, `resource` for `token`
//! and `jwks`, `admin` for `admin` and `doctor`, `canary` for the probe of
//! `doctor`; `subagent.pem` is picked with `--cert`/`--key`.

pub mod admin;
pub mod audit;
pub mod bench;
pub mod client;
pub mod dev;
pub mod doctor;
pub mod policy;
pub mod task;
pub mod templates;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default directory `leash dev` writes to and client commands read from.
pub const DEV_DIR: &str = ".leash-dev";

/// Leash: just-in-time, task-scoped credentials for AI agents.
#[derive(Debug, Parser)]
#[command(name = "leash", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format: `text` or `json`. Levels come from LEASH_LOG (default `info`).
    #[arg(long, global = true, default_value = "text", env = "LEASH_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker from a config file (production).
    Serve {
        /// TOML config file; see examples/leash.toml.
        #[arg(long, short, env = "LEASH_CONFIG")]
        config: PathBuf,
        /// Check the config and everything it names (certificates, keys,
        /// bundles, templates against the actor classes, policies, store
        /// files) as a start would, print what was found and exit: 0 if the
        /// broker would start, 64 otherwise. Listens on nothing; contacts
        /// neither Redis nor the Workload API.
        #[arg(long)]
        check_config: bool,
    },
    /// Run a complete local broker: throwaway CA, sample SVIDs, sample template, in-memory store.
    Dev(dev::DevArgs),
    /// Work with task-scope templates.
    Templates {
        /// What to do with templates.
        #[command(subcommand)]
        command: TemplatesCommand,
    },
    /// Check Cedar policies, and explain how a BeginTask would be decided.
    Policy {
        /// What to do with policies.
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Begin, renew and complete tasks (as an agent).
    Task {
        /// What to do with a task.
        #[command(subcommand)]
        command: task::TaskCommand,
    },
    /// Check credentials (as a resource server).
    Token {
        /// What to do with a token.
        #[command(subcommand)]
        command: task::TokenCommand,
    },
    /// Print the broker's JWK Set.
    Jwks {
        /// Connection.
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Inventory, approvals and kill switches (as an operator, over the Admin service).
    Admin(admin::AdminArgs),
    /// The durable audit trail: a task's whole story, or the trail as it grows.
    Audit(audit::AuditArgs),
    /// Drive concurrent agents doing begin → renew → complete and print throughput and latency.
    Bench(bench::BenchArgs),
    /// Check a live broker: store persistence and eviction, clock skew, trust bundle
    /// expiry, signing key age, the canary; then one revocation probe. Exit 1 if any fails.
    Doctor(doctor::DoctorArgs),
}

/// Template subcommands.
#[derive(Debug, Subcommand)]
pub enum TemplatesCommand {
    /// Validate every template in DIR; print every problem with file and line.
    Check {
        /// Directory of *.yaml templates.
        dir: PathBuf,
        /// Also check each template's `tenant:` and `classes:` against the
        /// actor classes of this config file, as the broker does at load.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// How a client command reaches the broker.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Broker agent address.
    #[arg(long, env = "LEASH_BROKER", default_value = "https://localhost:8443")]
    pub broker: String,
    /// PEM bundle the broker's certificate must chain to [default: <dev-dir>/bundle.pem].
    #[arg(long, env = "LEASH_CA")]
    pub ca: Option<PathBuf>,
    /// Your X509-SVID (PEM) [default: <dev-dir>/agent.pem; resource.pem for `token` and
    /// `jwks`; admin.pem for `admin`]. A subagent: <dev-dir>/subagent.pem.
    #[arg(long, env = "LEASH_CERT")]
    pub cert: Option<PathBuf>,
    /// Your SVID's private key (PEM) [default: <dev-dir>/agent-key.pem; resource-key.pem;
    /// admin-key.pem]. A subagent: <dev-dir>/subagent-key.pem.
    #[arg(long, env = "LEASH_KEY")]
    pub key: Option<PathBuf>,
    /// Directory written by `leash dev`, for the defaults above.
    #[arg(long, env = "LEASH_DEV_DIR", default_value = DEV_DIR)]
    pub dev_dir: PathBuf,
}

impl ConnectArgs {
    /// The files to use, with `role` (`agent`, `resource` or `admin`; the file
    /// stems of [`dev::SVIDS`]) choosing the dev-dir defaults.
    pub fn files(&self, role: &str) -> (PathBuf, PathBuf, PathBuf) {
        let d = &self.dev_dir;
        (
            self.ca.clone().unwrap_or_else(|| d.join("bundle.pem")),
            self.cert
                .clone()
                .unwrap_or_else(|| d.join(format!("{role}.pem"))),
            self.key
                .clone()
                .unwrap_or_else(|| d.join(format!("{role}-key.pem"))),
        )
    }

    /// Connects as `role`.
    ///
    /// # Errors
    /// [`client::ClientError`] if the files or the connection fail.
    pub async fn connect(
        &self,
        role: &str,
    ) -> Result<tonic::transport::Channel, client::ClientError> {
        let (ca, cert, key) = self.files(role);
        client::connect(
            &self.broker,
            &client::ClientFiles {
                bundle: &ca,
                cert: &cert,
                key: &key,
            },
        )
        .await
    }
}
