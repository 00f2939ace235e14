use std::process::ExitCode;

fn main() -> ExitCode {
    fusechat::cli::main()
}
