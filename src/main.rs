use std::process::ExitCode;

fn main() -> ExitCode {
    // Errors are reported as one clear line; library backtraces (candle captures them when
    // RUST_BACKTRACE is set) would only bury the message. RUST_LIB_BACKTRACE=1 still shows them.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    match ldm::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
