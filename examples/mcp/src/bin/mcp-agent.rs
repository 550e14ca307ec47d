//! `mcp-agent`: begins a Leash task, calls the `items` MCP tools with the
//! task's credential, completes the task and shows the next call refused.
//!
//! ```sh
//! cargo run -p leash-example-mcp --bin mcp-agent -- --dev-dir .leash-dev
//! ```

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use leash_example_mcp::{DEV_RESOURCE, agent};

/// Calls the `items` MCP server within a task of `--template`.
#[derive(Debug, Parser)]
struct Args {
    /// Where `leash dev` wrote its files.
    #[arg(long, default_value = ".leash-dev")]
    dev_dir: PathBuf,
    /// The broker's agent address.
    #[arg(long, default_value = "https://localhost:8443")]
    broker: String,
    /// The MCP server's URL (the audience of the template's grant).
    #[arg(long, default_value = DEV_RESOURCE)]
    url: String,
    /// The template to begin.
    #[arg(long, default_value = "mcp-demo")]
    template: String,
    /// Present a token exchanged at this RFC 8693 token endpoint (e.g.
    /// `https://localhost:8444/token`) instead of the task's credential.
    #[arg(long)]
    token_endpoint: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let options = agent::AgentOptions {
        template: args.template,
        token_endpoint: args.token_endpoint,
        ..agent::AgentOptions::dev(&args.dev_dir, &args.broker, &args.url)
    };
    match agent::run(&options).await {
        Ok(report) => {
            println!("task {} begun", report.task_id);
            println!("tools: {}", report.tools.join(", "));
            println!("add_item: {}", report.added);
            println!("list_items: {}", report.listed);
            println!(
                "task completed; {} credential(s) revoked",
                report.revoked_credentials
            );
            println!(
                "next call refused after {:?}: {}",
                report.refused_after, report.refusal
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mcp-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
