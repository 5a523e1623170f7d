//! The `mmproxy` binary: parse flags, start logging, run the daemon (or `check`).
use std::process::ExitCode;

use mmproxy::cli::{Args, Invocation};

fn main() -> ExitCode {
    let (args, check) = match Invocation::from_env() {
        Invocation::Run(args) => (args, false),
        Invocation::Check(args) => (args, true),
    };
    if let Err(e) = mmproxy::logging::init(args.log_format, args.verbose) {
        eprintln!("mmproxy: cannot start logging: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "cannot start the runtime"
            );
            return ExitCode::FAILURE;
        }
    };
    if check {
        return match runtime.block_on(mmproxy::check::run(&args)) {
            true => ExitCode::SUCCESS,
            false => ExitCode::FAILURE,
        };
    }
    run(&runtime, args)
}

fn run(runtime: &tokio::runtime::Runtime, args: Args) -> ExitCode {
    match runtime.block_on(mmproxy::daemon::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
