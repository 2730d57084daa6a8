use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use virtwarden::cli::{run, Cli, Command, LogFormat};
use virtwarden::logging::stderr_is_journal;

fn main() {
    let cli = Cli::parse();
    // The services (run, operator) report what they do; one-shot commands print their results instead.
    let default_level =
        if matches!(cli.command, Command::Run { .. } | Command::Operator { .. }) { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Under systemd (stderr is the journal) records go through the native journal protocol:
    // each with its priority and its fields (DOMAIN=…), and no timestamp of our own in the text.
    if cli.log_format == LogFormat::Text && stderr_is_journal() {
        if let Ok(layer) = virtwarden::logging::JournalLayer::connect() {
            tracing_subscriber::registry().with(filter).with(layer).init();
            let code = run(cli.command, &mut std::io::stdout(), &mut std::io::stderr());
            std::process::exit(code);
        }
    }
    // Colours only for a terminal: log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    // Unlocked handles: while `run` serves, other threads log to stderr.
    let code = run(cli.command, &mut std::io::stdout(), &mut std::io::stderr());
    std::process::exit(code);
}
