//! Keeping freed chunk buffers in the process.
//!
//! Every chunk and every pass of a streamed tensor allocates buffers of a few to tens of MiB
//! and frees them soon after. glibc's malloc serves such sizes with fresh mappings (above its
//! mmap threshold, or from per-thread arenas it trims on free), so each reuse page-faults
//! and flushes TLBs: measured at half the run time in the kernel for slerp and model_stock.
//! Raising the mmap and trim thresholds and keeping one arena makes the freed memory be
//! reused; the byte budget still bounds how much is live, so peak RSS stays bounded.

/// Tune the C allocator for the pipeline, once per process (glibc only; elsewhere nothing).
pub(crate) fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters, under glibc's own arena
            // lock; any values are valid for it.
            unsafe {
                // 32 MiB is the largest mmap threshold glibc accepts on 64-bit.
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        });
    }
}
