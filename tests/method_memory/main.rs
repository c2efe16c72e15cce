//! How much memory each mergekit method's whole-tensor arithmetic really holds, in f32 copies
//! of one operand, must not exceed what `TensorMerge::copies_per_operand` declares: the
//! pipeline's estimate uses it to decide when a tensor is streamed in passes instead, which is
//! what keeps every method within `--memory-limit`.
//!
//! Its own test binary, because it counts every allocation of the process (a counting global
//! allocator) while one tensor per operand is merged, with 3 operands (the base and two models)
//! or 2 where the method takes exactly two. `cargo test --test method_memory -- --nocapture`
//! prints the table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use mergestream::dtype::DType;
use mergestream::methods::mergekit::{
    Capability, InputCount, Kind, METHODS, Need, Resolved, Scope, Value,
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: a pointer this allocator returned, with its layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn whole_tensor_methods_hold_no_more_than_they_declare() {
    let n: usize = 1 << 18;
    let cols = 512;
    let rows = n / cols;
    let n = rows * cols;
    println!(
        "{:<20} {:>7} {:>9} {:>9}",
        "method", "inputs", "measured", "declared"
    );
    let mut checked = 0;
    for m in METHODS {
        // Three operands where the method takes them (base + two), else two.
        let Some(inputs) = [3usize, 2].into_iter().find(|&total| {
            let others = if m.needs_base() { total - 1 } else { total };
            m.check_inputs(InputCount { total, others }).is_ok()
        }) else {
            continue;
        };
        let base = m.needs_base().then_some(0);
        let mut p = Resolved::new(m.name(), base, inputs, 7);
        p.shape = vec![rows as u64, cols as u64];
        for param in m.params() {
            let v = match (param.need, param.kind) {
                (Need::Default(v), _) => v,
                (_, Kind::Number) => Value::Number(0.5),
                (_, _) => Value::Flag(false),
            };
            match param.scope {
                Scope::Tensor => p.set(param.name, v),
                Scope::Input => (0..inputs).for_each(|i| p.set_input(i, param.name, v)),
            }
        }
        let Ok(merge) = m.prepare(&p) else {
            println!("{:<20} (cannot prepare with default parameters)", m.name());
            continue;
        };
        if merge.capability() == Capability::Elementwise {
            continue; // works in small tiles: nothing tensor-sized
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let xs: Vec<Vec<f32>> = (0..inputs)
            .map(|_| {
                (0..n)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                    })
                    .collect()
            })
            .collect();
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let out = merge.merge(
            &xs,
            rows,
            cols,
            mergestream::methods::mergekit::D(DType::F32),
        );
        let peak = PEAK.load(Ordering::Relaxed);
        drop(out);
        // The operands themselves count: they are the first copy.
        let held = (peak - before) + inputs * n * 4;
        let copies = held as f64 / (inputs * n * 4) as f64;
        println!(
            "{:<20} {:>7} {:>9.2} {:>9}",
            m.name(),
            inputs,
            copies,
            merge.copies_per_operand()
        );
        checked += 1;
        assert!(
            copies <= merge.copies_per_operand() as f64,
            "{} holds {copies:.2} f32 copies per operand but declares {}",
            m.name(),
            merge.copies_per_operand()
        );
    }
    assert!(checked >= 15, "only {checked} methods measured");
}
