//! A tensor stored as a strided view of a byte span, and how to gather it into row-major,
//! little-endian order.
//!
//! Formats that store views (PyTorch pickles: transposed, sliced with a step, expanded
//! tensors, big-endian storages) describe them with a [`Strided`]; the reader reads the
//! span and calls [`Strided::gather`]. Nothing here knows which format the view came from,
//! so the pipeline never names a format's types.

use thiserror::Error;

/// Where a view's elements are within its span and how they are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Strided {
    /// Bytes per element.
    pub elem_size: u64,
    /// Bytes from the first to one past the last addressed element (what must be read).
    pub span: u64,
    pub shape: Vec<u64>,
    /// Strides in elements, one per dimension.
    pub strides: Vec<u64>,
    /// Row-major and dense: the span is the tensor, only byte order may need fixing.
    pub contiguous: bool,
    /// Elements are stored big-endian and are swapped to little-endian.
    pub big_endian: bool,
}

/// Why a span could not be gathered (a reason, for the caller to put in context).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct GatherError(pub &'static str);

impl Strided {
    /// Size of the tensor in row-major form (checked).
    pub fn nbytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))?
            .checked_mul(self.elem_size)
    }

    /// The tensor's elements, row-major, in the byte order they are stored in. Works for
    /// contiguous views too (a plain copy). The output is `nbytes()` long, which for an
    /// expanded tensor (stride 0) can be much larger than the span: callers with a memory
    /// budget should check `nbytes()`.
    pub fn gather_raw(&self, span: &[u8]) -> Result<Vec<u8>, GatherError> {
        let fail = GatherError;
        if u64::try_from(span.len()).ok() != Some(self.span) {
            return Err(fail("span length differs from byte_len"));
        }
        let es = usize::try_from(self.elem_size).map_err(|_| fail("element size overflows"))?;
        let total = self.nbytes().ok_or(fail("tensor size overflows"))?;
        let total = usize::try_from(total).map_err(|_| fail("tensor does not fit in memory"))?;
        if total == 0 {
            return Ok(Vec::new());
        }
        if self.contiguous {
            return Ok(span.to_vec());
        }
        let strides: Vec<usize> = self
            .strides
            .iter()
            .map(|&s| usize::try_from(s))
            .collect::<Result<_, _>>()
            .map_err(|_| fail("stride overflows"))?;
        let shape: Vec<usize> = self
            .shape
            .iter()
            .map(|&s| usize::try_from(s))
            .collect::<Result<_, _>>()
            .map_err(|_| fail("shape overflows"))?;
        let mut out = Vec::with_capacity(total);
        // An odometer over the index space, keeping the element offset incrementally so each
        // element costs O(1) amortized and the walk needs no recursion.
        let mut idx = vec![0usize; shape.len()];
        let mut elem = 0usize;
        loop {
            let byte = elem.checked_mul(es).ok_or(fail("offset overflows"))?;
            let end = byte.checked_add(es).ok_or(fail("offset overflows"))?;
            out.extend_from_slice(
                span.get(byte..end)
                    .ok_or(fail("element outside the span"))?,
            );
            // Advance the last dimension, carrying into earlier ones.
            let mut d = shape.len();
            loop {
                let Some(nd) = d.checked_sub(1) else {
                    return Ok(out);
                };
                d = nd;
                let (Some(i), Some(&n), Some(&s)) = (idx.get_mut(d), shape.get(d), strides.get(d))
                else {
                    return Err(fail("internal index error"));
                };
                *i = i.saturating_add(1);
                elem = elem.checked_add(s).ok_or(fail("offset overflows"))?;
                if *i < n {
                    break;
                }
                // Wrap this dimension back to 0.
                let back = n.checked_mul(s).ok_or(fail("offset overflows"))?;
                elem = elem.checked_sub(back).ok_or(fail("offset underflows"))?;
                *i = 0;
            }
        }
    }

    /// The tensor's elements, row-major and little-endian.
    pub fn gather(&self, span: &[u8]) -> Result<Vec<u8>, GatherError> {
        let mut bytes = self.gather_raw(span)?;
        if self.big_endian {
            let size = usize::try_from(self.elem_size).unwrap_or(1).max(1);
            for el in bytes.chunks_exact_mut(size) {
                el.reverse();
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_big_endian() {
        // A 2×3 tensor of u16 stored transposed (3×2 storage), big-endian.
        let v = Strided {
            elem_size: 2,
            span: 12,
            shape: vec![2, 3],
            strides: vec![1, 2],
            contiguous: false,
            big_endian: true,
        };
        let span: Vec<u8> = [0u16, 3, 1, 4, 2, 5]
            .iter()
            .flat_map(|x| x.to_be_bytes())
            .collect();
        let want: Vec<u8> = (0u16..6).flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(v.gather(&span), Ok(want));
        assert_eq!(
            v.gather(&span[1..]),
            Err(GatherError("span length differs from byte_len"))
        );
    }
}
