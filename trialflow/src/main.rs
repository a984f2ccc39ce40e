use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use trialflow::cli::{Cli, Command};
use trialflow_pipeline::shutdown;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `config check` starts nothing: no telemetry (its metrics listener would bind METRICS_ADDR),
    // no signal handlers, no runtime.
    let cli = match cli {
        Cli { command: Command::Config(command), .. } => {
            return match trialflow::config_check::run(command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
        cli => cli,
    };
    // What the watchdog names when the command itself does not end.
    let command = format!("the {} command", matches.subcommand_name().unwrap_or("trialflow"));
    // Before the runtime: the signal handlers and the watchdog do not depend on it.
    let stop = match shutdown::install(&cli.shutdown) {
        Ok(stop) => stop,
        Err(error) => {
            eprintln!("error: installing the shutdown watchdog: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(shutdown::tracked(command, trialflow::cli::run(cli, stop.clone()))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    };
    // The command has returned, error or not: whatever it left behind (a blocking read, a client
    // closing without a broker) gets the shutdown grace to end, then the watchdog ends the process.
    stop.cancel();
    drop(runtime);
    code
}
