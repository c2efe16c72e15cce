//! mergekit's merge methods, numerically as mergekit 0.1.5 computes them with PyTorch.
//!
//! Each method lives in its own file and is registered once in [`METHODS`]: its name, the
//! parameters it reads with their defaults, the inputs it needs, and its arithmetic (see
//! [`method`]). The planner derives everything it knows about methods from this table, so a
//! new method is one file plus one line in the `registry!` below.
//!
//! `linear` and `slerp` compute in f32 and round to the compute dtype D once. Every other
//! method runs its elementwise operations in D — each result rounded to D, which is what
//! PyTorch does for f16/bf16 tensors — while reductions accumulate in f32 in PyTorch's order
//! (`torch_compat`) and round once ([`arith::D`]). For D = f32 all of this is plain f32
//! arithmetic. Operands arrive already rounded to the config's `dtype` (mergekit casts at
//! load). Methods that need whole-tensor statistics also stream in passes over row chunks
//! ([`stream`]) when a tensor is too large to hold.

pub mod arith;
pub mod method;
pub mod stream;

// Helpers of the task-arithmetic family.
pub mod sparsify;
mod task_arithmetic_streamed;

use std::fmt;
use std::sync::Arc;

use crate::dtype::DType;
pub use arith::D;
pub use method::{
    Capability, InputCount, Kind, MergeMethod, Need, Param, PrepareError, Resolved, Scope,
    TensorMerge, Value,
};
pub use stream::{Chunk, ReadAt, StreamCtx};

/// Declares each method file as a module and lists what it registers, in one place.
macro_rules! registry {
    ($($module:ident: [$($method:ident),+ $(,)?]),* $(,)?) => {
        $(mod $module;)*

        /// Every merge method, by its `merge_method:` name.
        pub static METHODS: &[&dyn MergeMethod] = &[$($(&$module::$method),+),*];
    };
}

// A new method: its file in this folder, and one line here.
registry! {
    linear: [Linear],
    slerp: [Slerp],
    nuslerp: [NuSlerp],
    task_arithmetic: [
        TASK_ARITHMETIC,
        TIES,
        DARE_TIES,
        DARE_LINEAR,
        BREADCRUMBS_LINEAR,
        BREADCRUMBS_TIES,
        DELLA,
        DELLA_LINEAR,
    ],
    model_stock: [ModelStock],
    passthrough: [Passthrough],
    nearswap: [NearSwap],
    ram: [Ram, RamPlusTl],
    sce: [Sce],
    arcee_fusion: [ArceeFusion],
    multislerp: [MultiSlerp],
    karcher: [Karcher],
}

/// The method registered under `name`.
pub fn find(name: &str) -> Option<&'static dyn MergeMethod> {
    METHODS.iter().copied().find(|m| m.name() == name)
}

/// The registered names, for messages.
pub fn names() -> String {
    METHODS
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything a mergekit method needs for one output tensor.
#[derive(Clone)]
pub struct MergekitRecipe {
    pub method: &'static str,
    /// The resolved parameters, for the dry run ([`Resolved::describe`]).
    pub params: String,
    /// The dtype mergekit computes in (its "D"): the config dtype or the promoted inputs'.
    pub compute: DType,
    pub merge: Arc<dyn TensorMerge>,
}

impl MergekitRecipe {
    /// Merge whole operands (or one chunk of rows, for elementwise methods).
    pub fn merge(&self, xs: &[Vec<f32>], rows: usize, cols: usize) -> Vec<f32> {
        self.merge.merge(xs, rows, cols, D(self.compute))
    }

    /// [`MergekitRecipe::merge`], or why mergekit refuses these values.
    pub fn try_merge(
        &self,
        xs: &[Vec<f32>],
        rows: usize,
        cols: usize,
    ) -> std::result::Result<Vec<f32>, String> {
        self.merge.try_merge(xs, rows, cols, D(self.compute))
    }

    /// Stream the tensor in passes over its row chunks.
    pub fn stream(&self, ctx: &StreamCtx<'_>) -> crate::error::Result<()> {
        self.merge.stream(ctx, D(self.compute))
    }

    pub fn capability(&self) -> Capability {
        self.merge.capability()
    }
}

impl fmt::Debug for MergekitRecipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.method, self.compute, self.params)
    }
}

/// Two recipes are equal when they do the same arithmetic: the same method and parameters.
impl PartialEq for MergekitRecipe {
    fn eq(&self, other: &Self) -> bool {
        format!("{:?}", self.merge) == format!("{:?}", other.merge) && self.compute == other.compute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parameters_declared_once() {
        for (i, m) in METHODS.iter().enumerate() {
            assert!(
                METHODS[..i].iter().all(|o| o.name() != m.name()),
                "{} registered twice",
                m.name()
            );
            let ps = m.params();
            for (j, p) in ps.iter().enumerate() {
                assert!(
                    ps[..j].iter().all(|q| q.name != p.name),
                    "{}: `{}` declared twice",
                    m.name(),
                    p.name
                );
            }
        }
        assert!(find("ties").is_some());
        assert!(find("frobnicate").is_none());
        assert!(names().starts_with("linear, slerp, nuslerp"));
    }

    /// Resolve every declared parameter (required ones with a plausible value) for a slice
    /// the method accepts.
    fn resolved_for(m: &dyn MergeMethod) -> Resolved {
        let shapes = [
            (1, None),
            (2, Some(0)),
            (3, Some(2)),
            (3, None),
            (4, Some(0)),
        ];
        let (n, base) = shapes
            .into_iter()
            .find(|&(n, base): &(usize, Option<usize>)| {
                (base.is_some() || !m.needs_base())
                    && m.check_inputs(InputCount {
                        total: n,
                        others: n - usize::from(base.is_some()),
                    })
                    .is_ok()
            })
            .expect("some slice shape is accepted");
        let mut r = Resolved::new(m.name(), base, n, 7);
        for p in m.params() {
            let value = match (p.need, p.kind) {
                (Need::Default(v), _) => Some(v),
                (Need::Optional, _) => None,
                (_, Kind::Number) => Some(Value::Number(0.5)),
                (_, Kind::Flag) => Some(Value::Flag(false)),
            };
            if let Some(v) = value {
                match p.scope {
                    Scope::Tensor => r.set(p.name, v),
                    Scope::Input => (0..n).for_each(|i| r.set_input(i, p.name, v)),
                }
            }
        }
        r
    }

    #[test]
    fn every_method_reads_only_what_it_declares_and_merges() {
        for m in METHODS {
            let r = resolved_for(*m);
            let merge = m
                .prepare(&r)
                .unwrap_or_else(|e| panic!("{}: {e:?}", m.name()));
            // Two rows of three: every method gives one value per element.
            let xs: Vec<Vec<f32>> = (0..r.inputs)
                .map(|i| (0..6).map(|j| (i * 6 + j) as f32 * 0.25 - 1.0).collect())
                .collect();
            let out = merge.merge(&xs, 2, 3, D(DType::F32));
            assert_eq!(out.len(), 6, "{}", m.name());
            assert!(out.iter().all(|v| v.is_finite()), "{}: {out:?}", m.name());
        }
    }

    /// Run `merge`'s streamed path over `xs` in chunks of `chunk` rows.
    fn streamed(
        merge: &dyn TensorMerge,
        xs: &[Vec<f32>],
        (rows, cols): (usize, usize),
        chunk: u64,
        d: D,
    ) -> Vec<f32> {
        use std::ops::Range;
        let out = std::cell::RefCell::new(vec![f32::NAN; rows * cols]);
        let span = |r: &Range<u64>| r.start as usize * cols..r.end as usize * cols;
        let load = |r: Range<u64>| -> crate::error::Result<Chunk> {
            Ok(Chunk::from_values(
                xs.iter().map(|x| x[span(&r)].to_vec()).collect(),
            ))
        };
        // f32 output bytes: the values exactly as the method made them.
        let write = |r: Range<u64>, b: crate::aligned::AlignedOut| -> crate::error::Result<()> {
            let mut o = out.borrow_mut();
            crate::kernels::bytes::decode(DType::F32, b.bytes(), &mut o[span(&r)]);
            Ok(())
        };
        let ctx = StreamCtx {
            rows: rows as u64,
            cols,
            chunk_rows: chunk,
            load: &load,
            out_dtype: DType::F32,
            out_offset: 0,
            write: &write,
        };
        merge.stream(&ctx, d).expect("streams");
        out.into_inner()
    }

    /// Deterministic test operands: a base and models near it, quantized to f16 when asked
    /// (f16 task vectors take few distinct values, so statistics tie).
    fn operands(n_models: usize, numel: usize, f16: bool) -> Vec<Vec<f32>> {
        let mut z = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let base: Vec<f32> = (0..numel).map(|_| next() * 0.2).collect();
        let mut xs = vec![base.clone()];
        for _ in 0..n_models {
            xs.push(base.iter().map(|&b| b + next() * 0.06).collect());
        }
        if f16 {
            for x in &mut xs {
                D(DType::F16).q(x);
            }
        }
        xs
    }

    /// Largest difference in f32 ulps, and how many elements differ.
    fn ulps(a: &[f32], b: &[f32]) -> (u64, usize) {
        let key = |x: f32| {
            let b = x.to_bits() as i64;
            if b & 0x8000_0000 != 0 {
                -(b & 0x7FFF_FFFF)
            } else {
                b
            }
        };
        let d: Vec<u64> = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| key(x).abs_diff(key(y)))
            .collect();
        (
            d.iter().copied().max().unwrap_or(0),
            d.iter().filter(|&&u| u > 0).count(),
        )
    }

    #[test]
    fn new_methods_stream_in_row_chunks_as_they_merge_whole() {
        let (rows, cols) = (37, 29);
        // (method, parameters, f16 data, largest allowed ulp difference)
        type Case<'a> = (&'a str, &'a [(&'a str, f64)], bool, u64);
        let cases: &[Case<'_>] = &[
            // Row-local importances and exact order statistics: the same bits.
            ("arcee_fusion", &[], true, 0),
            // Integer counts: the same bits.
            ("ramplus_tl", &[("epsilon", 0.02)], true, 0),
            ("ram", &[("epsilon", 0.02)], true, 0),
            ("nearswap", &[("t", 0.01)], true, 0),
            // The mean squares are summed in f64 when streamed, in torch's f32 order whole;
            // the weights then differ in the last bits.
            ("sce", &[("select_topk", 1.0)], false, 8),
            ("sce", &[("select_topk", 0.3)], false, 8),
        ];
        for &(name, params, f16, max_ulp) in cases {
            let m = find(name).expect("registered");
            let n_models = if m
                .check_inputs(InputCount {
                    total: 3,
                    others: 2,
                })
                .is_ok()
            {
                2
            } else {
                1
            };
            let xs = operands(n_models, rows * cols, f16);
            let mut r = Resolved::new(m.name(), Some(0), xs.len(), 7);
            r.shape = vec![rows as u64, cols as u64];
            for p in m.params() {
                let v = params
                    .iter()
                    .find(|(n, _)| *n == p.name)
                    .map(|&(_, v)| Value::Number(v))
                    .or(match p.need {
                        Need::Default(v) => Some(v),
                        _ => None,
                    });
                if let Some(v) = v {
                    r.set(p.name, v);
                }
            }
            let merge = m.prepare(&r).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let d = D(DType::F32);
            let whole = merge.merge(&xs, rows, cols, d);
            for chunk in [1, 5, rows as u64] {
                let s = streamed(merge.as_ref(), &xs, (rows, cols), chunk, d);
                let (u, n) = ulps(&whole, &s);
                assert!(
                    u <= max_ulp,
                    "{name} {params:?}, chunks of {chunk}: {n} elements differ, up to {u} ulps"
                );
            }
        }
    }

    #[test]
    fn a_parameter_read_but_not_declared_is_reported_as_a_bug() {
        let r = Resolved::new("linear", None, 2, 0);
        assert_eq!(
            r.need_number("t"),
            Err(PrepareError::Undeclared {
                method: "linear",
                name: "t".into()
            })
        );
        assert_eq!(
            linear::Linear.prepare(&r).err(),
            Some(PrepareError::Undeclared {
                method: "linear",
                name: "weight".into()
            })
        );
    }
}
