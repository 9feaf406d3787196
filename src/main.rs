use std::process::ExitCode;

fn main() -> ExitCode {
    match ferrotune::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear message, with its causes, and no backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
