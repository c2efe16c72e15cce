//! Streaming a tensor in passes over its row chunks, for methods whose statistics span the
//! whole tensor (norms, dot products, top-k thresholds) when it is too large to hold.
//!
//! Sums in the streamed passes accumulate in f64 and elements tied at a magnitude threshold
//! are kept in index order, where the whole-tensor path follows PyTorch's reduction order
//! and sort exactly; PyTorch's own results for tensors this large depend on its thread count.

use std::ops::Range;

use crate::error::Result;

/// Loads the operands of a row range.
pub type LoadFn<'a> = &'a dyn Fn(Range<u64>) -> Result<Vec<Vec<f32>>>;
/// Writes output values of a row range.
pub type EmitFn<'a> = &'a dyn Fn(Range<u64>, &[f32]) -> Result<()>;

/// Elements per tile of the per-element work inside a chunk (stays in L2).
pub(crate) const TILE_ELEMS: usize = 32 * 1024;

/// Access to one step's data: operands by row range, and the output.
pub struct StreamCtx<'a> {
    pub rows: u64,
    pub cols: usize,
    pub chunk_rows: u64,
    /// The operands' values (decoded, patched, rounded) for a row range.
    pub load: LoadFn<'a>,
    /// Write output values (in the compute dtype's precision) for a row range.
    pub emit: EmitFn<'a>,
}

impl StreamCtx<'_> {
    /// One pass over the tensor, chunk by chunk in row order.
    pub fn pass(&self, mut f: impl FnMut(Range<u64>, Vec<Vec<f32>>) -> Result<()>) -> Result<()> {
        let mut r0 = 0;
        while r0 < self.rows {
            let r1 = (r0 + self.chunk_rows.max(1)).min(self.rows);
            f(r0..r1, (self.load)(r0..r1)?)?;
            r0 = r1;
        }
        Ok(())
    }
}

/// Σx² in f64.
pub(crate) fn sum_sq(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum()
}
