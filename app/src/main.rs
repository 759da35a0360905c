//! The `stored-messages` binary: parses the command line and hands over to the library.

/// Rendering a page allocates many small strings; mimalloc serves them faster than glibc's
/// allocator (see the README's "Performance" section).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    stored_messages_app::cli::run()
}
