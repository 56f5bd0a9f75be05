//! Wiring only: parse the command line, then serve, run `dev`, or run an operator subcommand.

use std::process::ExitCode;

use clap::Parser;
use openai_webhook_relay::config::ServeArgs;
use openai_webhook_relay::{App, Cli, Command, cli, dev, shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let Cli { command, serve } = Cli::parse();
    let result = match command.unwrap_or(Command::Serve(serve)) {
        Command::Serve(args) => run(args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Send(args) => cli::send(args).await,
        Command::Tail(args) => cli::tail(args).await,
        Command::ReplayDead(args) => cli::replay_dead(args).await,
        Command::Request(args) => cli::request(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A message naming what to fix, never a panic trace.
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.validate()?;
    // Dropped on the way out, after the app stopped: exports the last spans.
    let _telemetry = telemetry::init(config.args.log_format, "info")?;
    App::build(config).await?.run_until(shutdown::signal()).await
}
