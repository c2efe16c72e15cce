//! LoRA extraction arithmetic (mergekit-extract-lora 0.1.5): the task vector `ft − base` in
//! the tensors' own dtype, and its truncated SVD split into LoRA factors. No I/O.
//!
//! mergekit computes `torch.linalg.svd(Δ.float(), full_matrices=False)` (a full, not a
//! randomized, SVD in f32), keeps `rank = min(max_rank, k)` singular triplets — fewer when
//! `sv_epsilon > 0` drops those with `s ≤ ε` — and sets `A = diag(√s)·Vᴴ`, `B = U·diag(√s)`
//! (or `A = diag(s)·Vᴴ`, `B = U` without distribute-scale), cast back to Δ's dtype. The
//! singular vectors' signs are arbitrary, but `B·A` is not, so that is what agreement means.

use faer::MatRef;

use crate::dtype::DType;
use crate::kernels::bytes::round_to;

/// The dtype torch gives `a − b` for float tensors of these dtypes (type promotion).
pub fn promote(a: DType, b: DType) -> DType {
    if a == b {
        a
    } else if a == DType::F64 || b == DType::F64 {
        DType::F64
    } else {
        // f16 with bf16, or either with f32: torch promotes to f32.
        DType::F32
    }
}

/// `ft − base` as torch computes it in `dtype`: in f32, rounded once to `dtype` (torch's CPU
/// kernels for f16/bf16 compute in f32). Lengths must match.
/// The pipeline does the same in pieces: [`subtract`], then `round_to(dtype)` once.
pub fn task_vector(ft: &[f32], base: &[f32], dtype: DType) -> Vec<f32> {
    let mut d = ft.to_vec();
    subtract(&mut d, base);
    round_to(dtype, &mut d);
    d
}

/// `acc -= base`, in f32.
pub fn subtract(acc: &mut [f32], base: &[f32]) {
    for (a, b) in acc.iter_mut().zip(base) {
        *a -= b;
    }
}

/// Options of the decomposition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SvdOptions {
    pub max_rank: usize,
    /// Drop singular values `≤ sv_epsilon` (when positive).
    pub sv_epsilon: f64,
    /// √s on both factors (default), or all of s on A.
    pub distribute_scale: bool,
}

/// LoRA factors, row-major f32: `A` is `[rank, cols]`, `B` is `[rows, rank]`, `B·A ≈ Δ`.
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    /// All singular values, largest first (tests and messages use them).
    pub singular_values: Vec<f32>,
}

/// Decompose `delta` (`[rows, cols]`, row-major); with `transpose`, decompose `deltaᵀ`
/// instead (embeddings: PEFT's `lora_embedding_A` is `[r, vocab]`), so A is `[rank, rows]`
/// and B `[cols, rank]`. Fails when the SVD does not converge (NaN or infinite input).
pub fn decompose(
    delta: &[f32],
    rows: usize,
    cols: usize,
    transpose: bool,
    opts: &SvdOptions,
) -> std::result::Result<Factors, String> {
    if delta.len() != rows * cols {
        return Err(format!(
            "{} values for a [{rows}, {cols}] matrix",
            delta.len()
        ));
    }
    if delta.iter().any(|x| !x.is_finite()) {
        return Err("the weight difference has NaN or infinite values".into());
    }
    let m = MatRef::from_row_major_slice(delta, rows, cols);
    let m = if transpose { m.transpose() } else { m };
    let (mr, mc) = (m.nrows(), m.ncols());
    let svd = m
        .thin_svd()
        .map_err(|e| format!("the SVD did not converge ({e:?})"))?;
    let (u, v) = (svd.U(), svd.V());
    let s_col = svd.S().column_vector();
    let k = mr.min(mc);
    let singular_values: Vec<f32> = (0..k).map(|i| s_col[i]).collect();
    let mut rank = opts.max_rank.min(k);
    if opts.sv_epsilon > 0.0 {
        let kept = singular_values
            .iter()
            .filter(|&&s| f64::from(s) > opts.sv_epsilon)
            .count();
        rank = rank.min(kept);
    }
    let (scale_a, scale_b): (Vec<f32>, Vec<f32>) = if opts.distribute_scale {
        let r: Vec<f32> = singular_values[..rank].iter().map(|s| s.sqrt()).collect();
        (r.clone(), r)
    } else {
        (singular_values[..rank].to_vec(), vec![1.0; rank])
    };
    // A = diag(scale_a)·Vᴴ[:rank] (Vᴴ[i, j] = V[j, i]); B = U[:, :rank]·diag(scale_b).
    let mut a = vec![0f32; rank * mc];
    for i in 0..rank {
        for j in 0..mc {
            a[i * mc + j] = scale_a[i] * v[(j, i)];
        }
    }
    let mut b = vec![0f32; mr * rank];
    for i in 0..mr {
        for j in 0..rank {
            b[i * rank + j] = u[(i, j)] * scale_b[j];
        }
    }
    Ok(Factors {
        rank,
        a,
        b,
        singular_values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// B·A for factors of a [rows, cols] (or transposed) matrix.
    fn product(f: &Factors, rows: usize, cols: usize) -> Vec<f32> {
        let mut p = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                p[i * cols + j] = (0..f.rank)
                    .map(|k| f.b[i * f.rank + k] * f.a[k * cols + j])
                    .sum();
            }
        }
        p
    }

    /// A rank-2 6×4 matrix.
    fn low_rank() -> Vec<f32> {
        let u = [
            [1.0, 0.5],
            [-2.0, 1.0],
            [0.3, 0.0],
            [1.0, 1.0],
            [0.0, -1.5],
            [2.0, 0.25],
        ];
        let v = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -0.5, 0.75]];
        let mut d = vec![0f32; 24];
        for i in 0..6 {
            for j in 0..4 {
                d[i * 4 + j] = u[i][0] * v[0][j] + u[i][1] * v[1][j];
            }
        }
        d
    }

    #[test]
    fn rank_two_matrix_is_reconstructed_at_rank_two() {
        let d = low_rank();
        for distribute in [true, false] {
            let o = SvdOptions {
                max_rank: 8,
                sv_epsilon: 1e-3,
                distribute_scale: distribute,
            };
            let f = decompose(&d, 6, 4, false, &o).unwrap();
            assert_eq!(f.rank, 2, "ε drops the zero singular values");
            let p = product(&f, 6, 4);
            for (x, y) in p.iter().zip(&d) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn transposed_factors_reconstruct_the_transpose() {
        let d = low_rank();
        let o = SvdOptions {
            max_rank: 3,
            sv_epsilon: 0.0,
            distribute_scale: true,
        };
        let f = decompose(&d, 6, 4, true, &o).unwrap();
        assert_eq!(f.rank, 3);
        assert_eq!((f.a.len(), f.b.len()), (3 * 6, 4 * 3));
        let p = product(&f, 4, 6);
        for i in 0..4 {
            for j in 0..6 {
                assert!((p[i * 6 + j] - d[j * 4 + i]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn nan_is_an_error() {
        let mut d = low_rank();
        d[3] = f32::NAN;
        let o = SvdOptions {
            max_rank: 2,
            sv_epsilon: 0.0,
            distribute_scale: true,
        };
        assert!(decompose(&d, 6, 4, false, &o).is_err());
    }

    #[test]
    fn task_vector_rounds_once_to_the_dtype() {
        // 1 − 2⁻¹² is exact in f32 and halfway between two f16s (spacing 2⁻¹¹ below 1):
        // torch's f16 subtraction gives the even one, 1.0.
        let d = task_vector(&[1.0, 0.5], &[2f32.powi(-12), 0.0], DType::F16);
        assert_eq!(d, vec![1.0, 0.5]);
        assert_eq!(
            task_vector(&[1.0], &[2f32.powi(-12)], DType::F32)[0],
            1.0 - 2f32.powi(-12)
        );
        assert_eq!(promote(DType::F16, DType::BF16), DType::F32);
    }
}
