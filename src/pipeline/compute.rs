//! A compute worker's job: turn one loaded chunk into output bytes.

use crate::methods::{OperandData, PatchData, compute_chunk};
use crate::plan::{Plan, Recipe};

use super::{Loaded, Out, Written};

pub(crate) fn run(plan: &Plan, item: Loaded) -> Written {
    let step = &plan.steps[item.step];
    let Recipe::Compute { operands, .. } = &step.recipe else {
        unreachable!("copies go straight to the writer");
    };
    let data: Vec<OperandData<'_>> = operands
        .iter()
        .zip(&item.operands)
        .map(|(op, lo)| OperandData {
            bytes: &lo.bytes,
            patches: op
                .patches
                .iter()
                .zip(&lo.patches)
                .map(|(p, (a, b, m))| {
                    let at = plan.tensor(p.a);
                    let bt = plan.tensor(p.b);
                    PatchData {
                        a,
                        a_dtype: at.dtype,
                        a_shape: [at.shape[0] as usize, at.shape[1] as usize],
                        b,
                        b_dtype: bt.dtype,
                        b_shape: [bt.shape[0] as usize, bt.shape[1] as usize],
                        magnitude: m
                            .as_ref()
                            .zip(p.magnitude)
                            .map(|(mb, mr)| (&mb[..], plan.tensor(mr).dtype)),
                    }
                })
                .collect(),
        })
        .collect();
    let bytes = compute_chunk(plan, step, item.rows.clone(), &data);
    let out_row_bytes = step.row_elems() * step.dtype.bits() / 8;
    Written {
        shard: step.shard,
        offset: step.offset + item.rows.start * out_row_bytes,
        bytes: Out::Computed(bytes),
        _permit: item.permit,
    }
}
