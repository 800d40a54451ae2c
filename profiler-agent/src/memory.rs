//! Giving freed heap memory back to the kernel after the agent's big, short-lived allocations
//! (an unwind table being built, an interval's DWARF and kernel names, a parsed BTF). glibc
//! keeps freed memory in the arena of the thread that freed it, and only trims the top of
//! each arena, so without this the resident size of a long-running agent is the sum of every
//! thread's worst moment rather than its own worst moment.
//!
//! glibc also raises its mmap threshold to the size of every large block freed (up to
//! 32 MiB): after the first unwind table, later tables were carved from the early-snapshot
//! thread's arena and stayed resident there (8.5 MiB measured). [`configure`] fixes the
//! threshold, so blocks of 128 KiB and more are mapped on their own and unmapped when freed.

/// Fixes glibc's mmap threshold at 128 KiB (its initial value), which also turns off its
/// dynamic growth. Call once at start, before other threads exist.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

/// Returns every free page of every malloc arena to the kernel (glibc's `malloc_trim(0)`,
/// which also releases free pages in the middle of an arena). A few hundred microseconds;
/// call it after a phase that freed megabytes, not per sample.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
