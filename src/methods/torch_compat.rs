//! PLACEHOLDER until the exact PyTorch-order port lands: plain f64-accumulated reductions
//! and a stable sort. Same API as the exact version.

pub fn sum_f32(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64).sum::<f64>() as f32
}
pub fn norm_f32(x: &[f32]) -> f32 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt() as f32
}
pub fn sum_f16(x: &[f32]) -> f32 {
    sum_f32(x)
}
pub fn sum_bf16(x: &[f32]) -> f32 {
    sum_f32(x)
}
pub fn norm_f16(x: &[f32]) -> f32 {
    norm_f32(x)
}
pub fn norm_bf16(x: &[f32]) -> f32 {
    norm_f32(x)
}
pub fn outer_sum_f32(xs: &[&[f32]], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for x in xs {
            acc += x[j];
        }
        *o = acc;
    }
}
pub fn argsort_desc(keys: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by(|&a, &b| {
        keys[b]
            .partial_cmp(&keys[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx
}
pub fn argsort_asc(keys: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by(|&a, &b| {
        keys[a]
            .partial_cmp(&keys[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx
}
