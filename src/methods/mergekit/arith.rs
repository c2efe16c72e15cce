//! Arithmetic in a merge's compute dtype D, as PyTorch does it: every elementwise result
//! rounded to D, reductions accumulated in f32 in PyTorch's order and rounded once.

use crate::dtype::DType;
use crate::kernels::bytes::round_to;
use crate::methods::torch_compat as tc;

/// Arithmetic in the compute dtype D: every result rounded to D.
#[derive(Clone, Copy, Debug)]
pub struct D(pub DType);

impl D {
    pub fn q(self, v: &mut [f32]) {
        round_to(self.0, v);
    }
    pub fn qs(self, x: f32) -> f32 {
        let mut a = [x];
        round_to(self.0, &mut a);
        a[0]
    }
    pub fn sum(self, x: &[f32]) -> f32 {
        self.qs(match self.0 {
            DType::F16 => tc::sum_f16(x),
            DType::BF16 => tc::sum_bf16(x),
            _ => tc::sum_f32(x),
        })
    }
    pub fn norm(self, x: &[f32]) -> f32 {
        self.qs(match self.0 {
            DType::F16 => tc::norm_f16(x),
            DType::BF16 => tc::norm_bf16(x),
            _ => tc::norm_f32(x),
        })
    }
    /// The 2-norm over a strided (not the last) dim: torch's generic reduction, a sequential
    /// f32 `acc += x·x` (no FMA) for every dtype, then sqrt, rounded to D.
    pub fn norm_strided(self, x: impl IntoIterator<Item = f32>) -> f32 {
        let mut acc = 0f32;
        for v in x {
            acc += v * v;
        }
        self.qs(acc.sqrt())
    }
    /// `torch.stack(xs).sum(0)`: f32 accumulation in PyTorch's order, rounded to D.
    pub fn outer_sum(self, xs: &[&[f32]]) -> Vec<f32> {
        let mut out = vec![0f32; xs.first().map_or(0, |x| x.len())];
        tc::outer_sum_f32(xs, &mut out);
        self.q(&mut out);
        out
    }
    // PyTorch uses MKL's vsAcos/vsSin on f32; correctly rounded values differ from them in
    // the last bit now and then (a handful of elements per 100k in slerp/nuslerp).
    pub fn acos(self, x: f32) -> f32 {
        self.qs((x as f64).acos() as f32)
    }
    pub fn sin(self, x: f32) -> f32 {
        self.qs((x as f64).sin() as f32)
    }
    pub fn cos(self, x: f32) -> f32 {
        self.qs((x as f64).cos() as f32)
    }
    /// Elementwise `f(a, b)`, rounded to D.
    pub fn zip(self, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
        let mut v: Vec<f32> = a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
        self.q(&mut v);
        v
    }
    pub fn map(self, a: &[f32], f: impl Fn(f32) -> f32) -> Vec<f32> {
        let mut v: Vec<f32> = a.iter().map(|&x| f(x)).collect();
        self.q(&mut v);
        v
    }
}
