//! The `stored-messages` binary: parses the command line and hands over to the library.

fn main() -> std::process::ExitCode {
    stored_messages::cli::run()
}
