use std::process::ExitCode;

/// Weights are buffers over their files' mapped pages (see `ldm::mapped_memory`).
#[global_allocator]
static ALLOCATOR: ldm::mapped_memory::MappingAwareAllocator =
    ldm::mapped_memory::MappingAwareAllocator;

fn main() -> ExitCode {
    // Errors are reported as one clear line; library backtraces (candle captures them when
    // RUST_BACKTRACE is set) would only bury the message. RUST_LIB_BACKTRACE=1 still shows them.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    keep_freed_memory();
    match ldm::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// candle allocates a fresh buffer for every op's output. glibc serves large ones with mmap and
/// returns them with munmap, so each op pays page faults on freshly zeroed pages (measured: ~40%
/// of a CPU training step). Keeping freed memory in the heap lets the next op reuse it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    const NEVER_MMAP: i32 = i32::MAX;
    const NEVER_TRIM: i32 = i32::MAX;
    const GROW_HEAP_BY: i32 = 1 << 30;
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, NEVER_MMAP);
        libc::mallopt(libc::M_TRIM_THRESHOLD, NEVER_TRIM);
        libc::mallopt(libc::M_TOP_PAD, GROW_HEAP_BY);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
