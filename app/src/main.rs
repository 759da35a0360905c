//! The `stored-messages` binary: parses the command line and hands over to the library.

/// Rendering a page allocates many small strings; mimalloc serves them faster than glibc's
/// allocator (see the README's "Performance" section).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `arena_eager_commit` (its `mimalloc.h`, v3: option 4). By default mimalloc
/// commits its arenas eagerly on Linux and keeps what it freed; off, memory is committed as
/// it is used and given back when freed. Measured on the live-streams benchmark (10,000
/// idle streams on two servers, PostgreSQL): 48.3 → 36.6 KiB per stream, and an idle server
/// 64 → 43 MB, with no difference in the pages' CPU per request beyond noise.
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets mimalloc's options before anything allocates: Rust's runtime allocates before
/// `main`, and mimalloc reserves its first arena (which covers a server's whole heap) then.
/// Constructors in `.init_array` run before that.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static MIMALLOC_OPTIONS: extern "C" fn() = mimalloc_options;

#[cfg(target_os = "linux")]
extern "C" fn mimalloc_options() {
    // SAFETY: sets one option value; mimalloc allows it before it initialises, and
    // nothing runs concurrently this early.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

fn main() -> std::process::ExitCode {
    stored_messages_app::cli::run()
}
