//! The `mmproxy` binary: parse flags, start logging, run the daemon.
use std::process::ExitCode;

use mmproxy::cli::Args;

fn main() -> ExitCode {
    let args = Args::from_env();
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
    match runtime.block_on(mmproxy::daemon::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
