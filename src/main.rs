//! `deptsync`: parse the command line, run it, print the error chain, exit.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use deptsync::cli::{self, Cli, Command, Exit, LogFormat};
use deptsync::progress::Display;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let display = progress_display(&cli);
    init_logging(&cli, &display);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(Exit::Failure as u8);
        }
    };
    let exit = runtime.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(cancel_on_signal(cancel.clone()));
        match cli::run(cli, cancel, display).await {
            Ok(exit) => exit,
            Err(e) => {
                // The whole cause chain on one line, each cause once.
                match &e {
                    cli::CliError::Failed(inner) => {
                        eprintln!("error: {}", deptsync::cause_chain(inner.as_ref()));
                    }
                    other => eprintln!("error: {other}"),
                }
                e.exit()
            }
        }
    });
    ExitCode::from(exit as u8)
}

/// Bars for the long one-shot commands when stderr is a terminal (not journald) and the
/// logs are text; log lines otherwise.
fn progress_display(cli: &Cli) -> Display {
    let long_work = match &cli.command {
        Command::Sync(_) => true,
        #[cfg(feature = "demo")]
        Command::Demo(args) => !args.serve,
        _ => false,
    };
    let terminal = std::io::stderr().is_terminal()
        && std::env::var_os("JOURNAL_STREAM").is_none()
        && cli.log_format == LogFormat::Text;
    Display::new(long_work && terminal)
}

/// Logs go to stdout for the service (journald reads it) and to stderr for the one-shot
/// commands, whose stdout is their output (`status --json`). Colours only on a terminal,
/// never under journald; JSON lines with `--log-format json`; `RUST_LOG` filters.
fn init_logging(cli: &Cli, display: &Display) {
    // What an operator reads: deptsync's INFO and everyone's warnings, not the
    // libraries' chatter or PostgreSQL's notices ("relation ... already exists,
    // skipping"). The demo tells its own story on stdout: only warnings beside it.
    let default = match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo(_) => "warn",
        _ => "warn,deptsync=info",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let to_stdout = matches!(cli.command, Command::Run);
    let on_terminal = if to_stdout {
        std::io::stdout().is_terminal()
    } else {
        std::io::stderr().is_terminal()
    };
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let display = display.clone();
    let writer = move || -> Box<dyn std::io::Write> {
        if to_stdout {
            Box::new(std::io::stdout())
        } else {
            display.log_writer()
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match cli.log_format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.with_ansi(on_terminal && !under_journald).init(),
    }
}

/// Cancels `token` on SIGINT or SIGTERM: passes stop after the page in hand.
async fn cancel_on_signal(token: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("interrupted; stopping after the page in hand"),
        _ = terminate => tracing::info!("terminated; stopping after the page in hand"),
    }
    token.cancel();
}
