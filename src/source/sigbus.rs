//! Input mappings that survive their file being truncated.
//!
//! Reading a mapped page past a file's new end raises SIGBUS, which would kill the process
//! with no message and leave its staging folder behind. Every input mapping is registered
//! here; a SIGBUS handler that finds the faulting address inside one of them maps a zero
//! page over it, so the read goes on (with zeros). The run cannot commit those zeros: input
//! files are pinned for the run (size, times), so the truncated file fails the check before
//! the commit, with an error naming it. A SIGBUS anywhere else gets the default action, as
//! if no handler were installed.

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Registered mappings: (start address, length); start 0 marks a free slot. A fixed table
/// of atomics, because the handler may take no lock and allocate nothing.
const SLOTS: usize = 1024;
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

static INSTALL: Once = Once::new();

/// A mapping under guard; unregistered on drop (before the mapping itself is unmapped).
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            LENS[i].store(0, Ordering::SeqCst);
            STARTS[i].store(0, Ordering::SeqCst);
        }
    }
}

/// Guard `len` bytes at `start` (a live read-only mapping). With every slot taken the
/// mapping is simply unguarded, as all mappings were before.
pub fn guard(start: *const u8, len: usize) -> Guard {
    INSTALL.call_once(install);
    let addr = start as usize;
    for i in 0..SLOTS {
        if STARTS[i]
            .compare_exchange(0, addr, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            LENS[i].store(len, Ordering::SeqCst);
            return Guard { slot: Some(i) };
        }
    }
    Guard { slot: None }
}

fn install() {
    // SAFETY: `action` is fully initialised before use; the handler only reads atomics and
    // makes system calls (mmap, sigaction), which is what a signal handler may do.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGBUS it holds
    // the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for i in 0..SLOTS {
        let start = STARTS[i].load(Ordering::SeqCst);
        let len = LENS[i].load(Ordering::SeqCst);
        if start != 0 && addr >= start && addr < start.saturating_add(len) {
            // SAFETY: sysconf has no preconditions.
            let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
                p if p > 0 => p as usize,
                _ => 4096,
            };
            let at = addr - addr % page;
            // SAFETY: the page lies inside a registered input mapping that is still mapped
            // (guards unregister before unmapping), so replacing it affects only that
            // mapping, whose bytes are read-only input the run will reject anyway.
            let zero = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zero != libc::MAP_FAILED {
                return; // the faulting read resumes, reading zeros
            }
            break;
        }
    }
    // Not ours (or the page could not be replaced): the default action, as without us.
    // SAFETY: restoring the default disposition; the fault then repeats and ends the process.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}
