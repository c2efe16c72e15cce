//! Tensors as the pipeline cuts them: row-major, the first dimension is the rows and the
//! rest is one row. Input tensors (`model::TensorInfo`) and output steps (`plan::Step`)
//! share this one definition.

use crate::dtype::DType;

pub trait RowMajor {
    fn dims(&self) -> &[u64];
    fn elem_type(&self) -> DType;

    /// Rows for chunked processing: the first dimension (1 for a scalar).
    fn rows(&self) -> u64 {
        self.dims().first().copied().unwrap_or(1)
    }

    /// Elements in one row: the product of all dimensions but the first.
    fn row_elems(&self) -> u64 {
        // Saturating: an empty tensor may have huge other dimensions.
        self.dims()
            .iter()
            .skip(1)
            .fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Bytes of one row (sub-byte types round down: their rows are never split).
    fn row_bytes(&self) -> u64 {
        self.row_elems() * self.elem_type().bits() / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct T(Vec<u64>, DType);
    impl RowMajor for T {
        fn dims(&self) -> &[u64] {
            &self.0
        }
        fn elem_type(&self) -> DType {
            self.1
        }
    }

    #[test]
    fn rows_of_scalars_vectors_and_empty_tensors() {
        let t = T(vec![], DType::F16);
        assert_eq!((t.rows(), t.row_elems(), t.row_bytes()), (1, 1, 2));
        let t = T(vec![7], DType::F32);
        assert_eq!((t.rows(), t.row_elems(), t.row_bytes()), (7, 1, 4));
        let t = T(vec![3, 4, 5], DType::BF16);
        assert_eq!((t.rows(), t.row_elems(), t.row_bytes()), (3, 20, 40));
        let t = T(vec![0, u64::MAX, 4], DType::F16);
        assert_eq!((t.rows(), t.row_elems()), (0, u64::MAX));
    }
}
