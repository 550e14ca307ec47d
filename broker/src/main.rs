//! The `leash` binary: parses the command line, sets up logging, runs one command.
//!
//! Exit codes: 0 success; 1 failure; 64 configuration or usage error (every
//! problem is printed); 65 `templates check` or `policy check` found problems;
//! 2 `policy explain` decided deny.

use std::process::ExitCode;

use clap::Parser as _;
use leash_broker::{
    cli::{self, Cli, Command, LogFormat, TemplatesCommand},
    config::Config,
    server,
};
use tokio::net::TcpListener;

/// mimalloc, not glibc malloc: under load the broker allocates from every
/// worker thread, and glibc's arena lock showed in profiles (issue 10).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;

/// Installs the log subscriber; the returned guard flushes queued lines when
/// dropped, so `main` keeps it to the end.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEASH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A slow stderr pipe must never stall a request: lines go through a
    // bounded queue (see `logging::non_blocking`).
    let (writer, guard) = leash_broker::logging::non_blocking(std::io::stderr());
    // Both formats escape control characters in every value (see `logging`).
    leash_broker::logging::subscriber(format, filter, writer).init();
    guard
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

async fn serve(config: Config, banner: Option<String>) -> ExitCode {
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let (agent, ops) = match (
        bind(config.listen.agent).await,
        bind(config.listen.ops).await,
    ) {
        (Ok(a), Ok(o)) => (a, o),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("leash: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(b) = banner {
        eprintln!("{b}");
    }
    match server::serve(config, agent, ops, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(server::ServerError::Setup(e)) => {
            eprintln!("leash: cannot start: {e}");
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            eprintln!("leash: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(result: Result<serde_json::Value, cli::task::CommandError>) -> ExitCode {
    match result {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("leash: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = init_tracing(cli.log_format);
    match cli.command {
        Command::Serve {
            config,
            check_config,
        } => match Config::load(&config) {
            Ok(c) if check_config => match server::check_config(&c).await {
                Ok(found) => {
                    print!("{}: ok\n{found}", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("leash: {}: {e}", config.display());
                    ExitCode::from(EX_USAGE)
                }
            },
            Ok(c) => serve(c, None).await,
            Err(e) => {
                eprintln!("leash: {} has {} problem(s):", config.display(), e.0.len());
                for p in &e.0 {
                    eprintln!("  - {p}");
                }
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Dev(args) => match cli::dev::prepare(&args) {
            Ok(config) => {
                let program = std::env::args().next().unwrap_or_else(|| "leash".into());
                serve(config, Some(cli::dev::next_steps(&args, &program))).await
            }
            Err(e) => {
                eprintln!("leash dev: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Templates {
            command: TemplatesCommand::Check { dir, config },
        } => match cli::templates::check(&dir, config.as_deref()) {
            Ok(set) => {
                println!("{}: {} template(s) OK", dir.display(), set.len());
                ExitCode::SUCCESS
            }
            Err(cli::templates::CheckError::Templates(e)) => {
                eprintln!("{e}");
                eprintln!("{}: {} problem(s)", dir.display(), e.0.len());
                ExitCode::from(EX_DATAERR)
            }
            Err(e) => {
                eprintln!("leash templates check: --config: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Policy {
            command: cli::policy::PolicyCommand::Check { dir, time_zone },
        } => match cli::policy::check(&dir, &time_zone) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{}: {} problem(s)", dir.display(), e.0.len());
                ExitCode::from(EX_DATAERR)
            }
        },
        Command::Policy {
            command: cli::policy::PolicyCommand::Explain(args),
        } => match cli::policy::explain(&args) {
            Ok(explanation) => {
                print!("{}", explanation.report);
                if explanation.allowed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(cli::policy::EXIT_DENIED)
                }
            }
            Err(e) => {
                eprintln!("leash policy explain: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Task { command } => print_json(cli::task::run_task(command).await),
        Command::Token { command } => print_json(cli::task::run_token(command).await),
        Command::Jwks { connect } => print_json(cli::task::run_jwks(connect).await),
        Command::Admin(args) => cli::admin::execute(args).await,
        Command::Audit(args) => cli::audit::execute(args).await,
        Command::Doctor(args) => cli::doctor::execute(args).await,
        Command::Bench(args) => match cli::bench::run(args).await {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("leash bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
