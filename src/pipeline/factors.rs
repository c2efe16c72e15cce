//! LoRA factors read once per step by each thread, not once per chunk.
//!
//! Every chunk of a patched tensor needs the patch's whole factors (A is rank × in, B out ×
//! rank): a step cut into 30–60 chunks read them 30–60 times. Mapped, that costs little;
//! read (`--io read`, remote sources) it copied 3.4 GB of factors for a 1.3 GB LoRA run
//! (seed recipe + rank-64 LoRA, 2 layers of 13B: more than the model bytes themselves).
//! A thread keeps the factors of the step it works on and lets them go when it starts
//! another step or runs out of work, so what it keeps is what the permits of the step's
//! chunks in flight (which share them) already count: `chunking::chunk_cost` charges each
//! chunk the whole factors. Only a thread inside a [`Scope`] keeps anything.

use std::cell::RefCell;
use std::sync::Arc;

use crate::error::Result;
use crate::plan::TensorRef;

use super::reader::Buf;

#[derive(Default)]
struct StepFactors {
    /// Inside a [`Scope`].
    active: bool,
    step: Option<usize>,
    kept: Vec<(TensorRef, Arc<Buf>)>,
}

thread_local! {
    static KEPT: RefCell<StepFactors> = RefCell::default();
}

/// While alive, this thread keeps factors (from [`enter`] on); dropped, it lets them go, so
/// nothing outlives a run (whose step numbers another run's plan would reuse).
pub(crate) struct Scope(());

pub(crate) fn scope() -> Scope {
    KEPT.with(|k| {
        *k.borrow_mut() = StepFactors {
            active: true,
            ..StepFactors::default()
        }
    });
    Scope(())
}

impl Drop for Scope {
    fn drop(&mut self) {
        // Never panics: a thread-local being destroyed is left to its own destructor.
        let _ = KEPT.try_with(|k| {
            if let Ok(mut k) = k.try_borrow_mut() {
                *k = StepFactors::default();
            }
        });
    }
}

/// This thread now works on step `step`: factors kept for another step are let go.
/// Outside a [`Scope`] nothing is kept, so no later run (whose plan reuses the step
/// numbers) can be served another's factors.
pub(crate) fn enter(step: usize) {
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        if k.step != Some(step) {
            k.kept.clear();
            k.step = Some(step).filter(|_| k.active);
        }
    });
}

/// This thread has no work for now: its factors are let go (no permit counts them).
pub(crate) fn leave() {
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        k.kept.clear();
        k.step = None;
    });
}

/// Factor `r` of the current step: kept by this thread, or read with `read` and kept.
pub(crate) fn factor(r: TensorRef, read: impl FnOnce() -> Result<Buf>) -> Result<Arc<Buf>> {
    let kept = KEPT.with(|k| {
        let k = k.borrow();
        k.kept
            .iter()
            .find(|(t, _)| *t == r)
            .map(|(_, b)| Arc::clone(b))
    });
    if let Some(b) = kept {
        return Ok(b);
    }
    let b = Arc::new(read()?);
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        // Outside a step (no `enter`), nothing is kept.
        if k.step.is_some() {
            k.kept.push((r, Arc::clone(&b)));
        }
    });
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(tensor: usize) -> TensorRef {
        TensorRef { source: 1, tensor }
    }

    #[test]
    fn a_step_reads_each_factor_once_per_thread_and_lets_it_go_after() {
        let reads = std::cell::Cell::new(0);
        let read = |v: u8| {
            reads.set(reads.get() + 1);
            Ok(Buf::Owned(vec![v; 3]))
        };
        let scope = scope();
        enter(4);
        for _ in 0..3 {
            assert_eq!(&**factor(t(0), || read(7)).unwrap(), &[7; 3]);
            assert_eq!(&**factor(t(1), || read(8)).unwrap(), &[8; 3]);
        }
        assert_eq!(reads.get(), 2);
        // Another step: the old factors are gone (read again when asked).
        enter(5);
        let kept = factor(t(0), || read(9)).unwrap();
        assert_eq!(&**kept, &[9; 3]);
        assert_eq!(reads.get(), 3);
        // A failed read keeps nothing and reports its error.
        let err = factor(t(2), || Err(crate::error::Error::invalid("bad factor")));
        assert!(err.is_err());
        assert_eq!(&**factor(t(2), || read(1)).unwrap(), &[1; 3]);
        // Running out of work lets the factors go.
        leave();
        assert_eq!(&**factor(t(2), || read(2)).unwrap(), &[2; 3]);
        assert_eq!(reads.get(), 5);
        // The end of the scope lets everything go, and outside one nothing is kept, even
        // after `enter`.
        enter(5);
        assert_eq!(&**factor(t(2), || read(2)).unwrap(), &[2; 3]);
        drop(scope);
        enter(5);
        assert_eq!(&**factor(t(2), || read(3)).unwrap(), &[3; 3]);
        assert_eq!(&**factor(t(2), || read(4)).unwrap(), &[4; 3]);
        assert_eq!(reads.get(), 8);
        // Another thread keeps its own (nothing here).
        std::thread::spawn(|| {
            let fresh = factor(t(0), || Ok(Buf::Owned(vec![2]))).unwrap();
            assert_eq!(&**fresh, &[2]);
        })
        .join()
        .unwrap();
    }
}
