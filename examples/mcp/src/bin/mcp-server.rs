//! `mcp-server`: the `items` MCP tools behind Leash authentication, over TLS.
//!
//! ```sh
//! cargo run -p leash-example-mcp --bin mcp-server -- --dev-dir .leash-dev
//! ```

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use leash_example_mcp::{DEV_ISSUER, DEV_RESOURCE, server};

/// Serves the `items` MCP tools, accepting Leash credentials for `--resource`.
#[derive(Debug, Parser)]
struct Args {
    /// Where `leash dev` wrote its files.
    #[arg(long, default_value = ".leash-dev")]
    dev_dir: PathBuf,
    /// The broker's agent address (for the revocation stream and JWK Set).
    #[arg(long, default_value = "https://localhost:8443")]
    broker: String,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: String,
    /// The MCP endpoint's URL: the audience of the grant that gives access.
    #[arg(long, default_value = DEV_RESOURCE)]
    resource: String,
    /// The broker's issuer.
    #[arg(long, default_value = DEV_ISSUER)]
    issuer: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    leash_example_mcp::install_crypto_provider();
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", args.listen);
            return ExitCode::from(64);
        }
    };
    eprintln!(
        "MCP server for {} on {}; metadata at {}",
        args.resource,
        args.listen,
        server::resource(&args.resource, &args.issuer)
            .metadata_url()
            .unwrap_or_default()
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match server::run(
        &server::ServerFiles::dev(&args.dev_dir),
        &args.broker,
        &server::resource(&args.resource, &args.issuer),
        listener,
        shutdown,
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcp-server: {e}");
            ExitCode::FAILURE
        }
    }
}
