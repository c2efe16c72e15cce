//! A byte budget: a counting semaphore over bytes of working memory.
//!
//! The reader takes a [`Permit`] for each chunk before reading it; the permit travels with
//! the chunk, shrinks to the output bytes once they are computed, and is released when
//! those are written. So input buffers, f32 working
//! space and output bytes in flight never exceed the budget, whatever the model size. A
//! chunk larger than the whole budget waits until it is alone.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug)]
pub struct Budget {
    capacity: u64,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    peak: u64,
}

/// Bytes held from the budget; returned on drop.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Budget {
    pub fn new(capacity: u64) -> Arc<Budget> {
        Arc::new(Budget {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        })
    }

    /// Wait for `bytes` (or the whole budget, for an oversized request). Returns `None` if
    /// `stop` turns true while waiting.
    pub fn acquire(self: &Arc<Self>, bytes: u64, stop: &dyn Fn() -> bool) -> Option<Permit> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if stop() {
                return None;
            }
            let fits = st.used.saturating_add(bytes) <= self.capacity;
            if fits || st.used == 0 {
                st.used += bytes;
                st.peak = st.peak.max(st.used);
                return Some(Permit {
                    budget: Arc::clone(self),
                    bytes,
                });
            }
            st = self
                .freed
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The most bytes ever held at once.
    pub fn peak(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).peak
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

impl Permit {
    /// Keep only `keep` of the permit's bytes and return the rest (a chunk whose inputs are
    /// freed holds only its output while that waits for the disk).
    pub fn shrink(&mut self, keep: u64) {
        if keep >= self.bytes {
            return;
        }
        let give = self.bytes - keep;
        self.bytes = keep;
        let mut st = self.budget.state.lock().unwrap_or_else(|e| e.into_inner());
        st.used -= give;
        drop(st);
        self.budget.freed.notify_all();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.budget.state.lock().unwrap_or_else(|e| e.into_inner());
        st.used -= self.bytes;
        drop(st);
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_until_released_and_admits_oversized_alone() {
        let b = Budget::new(100);
        let never = || false;
        let p1 = b.acquire(60, &never).unwrap();
        let b2 = Arc::clone(&b);
        let t = std::thread::spawn(move || {
            let _p = b2.acquire(60, &|| false).unwrap();
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished());
        drop(p1);
        t.join().unwrap();
        let big = b.acquire(500, &never).unwrap();
        assert_eq!(b.peak(), 500);
        drop(big);
        assert!(b.acquire(1, &|| true).is_none());
    }

    #[test]
    fn a_shrunk_permit_returns_the_rest_at_once() {
        let b = Budget::new(100);
        let never = || false;
        let mut p = b.acquire(90, &never).unwrap();
        p.shrink(30);
        // 70 bytes now fit beside the 30 kept, without waiting (a second look gives up).
        let looked = std::cell::Cell::new(false);
        let q = b
            .acquire(70, &|| looked.replace(true))
            .expect("fits at once");
        p.shrink(50); // growing is not shrinking: nothing changes
        drop(p);
        drop(q);
        let all = b.acquire(100, &never).unwrap();
        assert_eq!(b.peak(), 100);
        drop(all);
    }
}
