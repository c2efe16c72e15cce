//! mergekit's spherical methods against golden2: multislerp, karcher, the nuslerp flag
//! combinations, and the methods that reduce over an axis on a vision-language model's 1-D
//! and 4-D tensors (`mk_m3_*`). Tolerance (DESIGN §6): at most 1 ulp on at most 2% of
//! elements; each test says which cases are exact and why the others are not.
//!
//! The inexact cases were traced by re-running mergekit 0.1.5's own code with one torch
//! function swapped at a time: with correctly rounded acos/sin/cos (and, for karcher,
//! `torch.dot` as `(a*b).sum()`) it reproduces our outputs bit for bit. The differences
//! are MKL's vector acos/sin/cos, which are not always correctly rounded, and MKL's `sdot`,
//! whose summation order is its own.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;

fn run(name: &str, extra: &[&str]) -> (tempfile::TempDir, Diff) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let config = format!("mergekit/{name}.yml");
    let mut args = vec![
        "merge",
        &config,
        out.to_str().unwrap(),
        "--out-shard-size",
        "100K",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&golden2(), &args);
    check_output_folder(&out);
    let d = assert_within(&out, &golden2().join("expected").join(name), 1, 0.02);
    (tmp, d)
}

fn exact(name: &str) {
    let (_t, d) = run(name, &[]);
    assert_eq!(d.differing, 0, "{name}: {d:?}");
}

/// Within tolerance, with at most `n` differing elements (the measured count): a change
/// that moves more elements fails even while the tolerance holds.
fn at_most(name: &str, n: u64) {
    let (_t, d) = run(name, &[]);
    assert!(d.differing <= n, "{name}: {d:?}");
}

/// Streamed in passes (a memory limit far below the tensors): sums over the whole tensor
/// accumulate in f64 there, not in torch's order, so a few more elements are 1 ulp off.
fn streamed(name: &str) {
    let (_t, d) = run(name, &["--memory-limit", "16KiB"]);
    assert!(d.max_ulp <= 1, "{name}: {d:?}");
}

#[test]
fn mk_multislerp_base_is_exact() {
    exact("mk_multislerp_base");
}

#[test]
fn mk_multislerp_nobase_is_exact() {
    exact("mk_multislerp_nobase");
}

#[test]
fn mk_karcher_default_is_exact() {
    exact("mk_karcher_default");
}

#[test]
fn mk_karcher_within_tolerance() {
    // Three models: 8 elements from MKL's acos/sin/cos, 12 from MKL's sdot order.
    at_most("mk_karcher", 20);
}

#[test]
fn mk_nuslerp_colwise_within_tolerance() {
    // MKL's acos/sin (4 elements).
    at_most("mk_nuslerp_colwise", 4);
}

#[test]
fn mk_nuslerp_flatten_wins_over_row_wise() {
    // Row-wise would be ~98% of elements off by up to 15000 ulp; flattened, only MKL's
    // acos/sin (7 elements).
    at_most("mk_nuslerp_flatten_rowwise", 7);
}

#[test]
fn mk_nuslerp_rowwise_within_tolerance() {
    // Per column, in torch's strided reduction order; MKL's acos/sin (8 elements).
    at_most("mk_nuslerp_rowwise", 8);
}

#[test]
fn mk_m3_nuslerp_within_tolerance() {
    // Flattened 4-D and 1-D tensors; MKL's acos/sin (1 element).
    at_most("mk_m3_nuslerp", 1);
}

#[test]
fn mk_m3_nuslerp_rowwise_within_tolerance() {
    // The 4-D conv per vector along dim 0, the 1-D norms as one vector; MKL's acos/sin
    // (12 elements).
    at_most("mk_m3_nuslerp_rowwise", 12);
}

#[test]
fn mk_m3_model_stock_filterwise_is_exact() {
    exact("mk_m3_model_stock_filterwise");
}

#[test]
fn mk_m3_slerp_within_tolerance() {
    // MKL's acos/sin (7 elements).
    at_most("mk_m3_slerp", 7);
}

#[test]
fn streamed_multislerp_within_tolerance() {
    streamed("mk_multislerp_base");
    streamed("mk_multislerp_nobase");
}

#[test]
fn streamed_karcher_within_tolerance() {
    streamed("mk_karcher");
    streamed("mk_karcher_default");
}

#[test]
fn streamed_row_wise_methods_within_tolerance() {
    streamed("mk_nuslerp_rowwise");
    streamed("mk_nuslerp_colwise");
    streamed("mk_m3_nuslerp_rowwise");
    let (_t, d) = run("mk_m3_model_stock_filterwise", &["--memory-limit", "16KiB"]);
    // Per-vector statistics: every chunk holds whole vectors, so streaming changes nothing.
    assert_eq!(d.differing, 0, "{d:?}");
}

/// Write `yaml` (`{G}` standing for golden2's models folder) and run it.
fn run_config(tmp: &Path, yaml: &str) -> (std::process::Output, PathBuf) {
    run_config_with(tmp, yaml, &[])
}

fn run_config_with(tmp: &Path, yaml: &str, extra: &[&str]) -> (std::process::Output, PathBuf) {
    run_yaml(tmp, yaml, &golden2().join("models"), extra)
}

/// mergekit 0.1.5 rejects this config too (each case was run through it).
fn rejected(yaml: &str, needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (o, out) = run_config(tmp.path(), yaml);
    let mut all = vec!["config.yml"];
    all.extend_from_slice(needles);
    assert_clean_failure(&o, &out, &all);
}

#[test]
fn karcher_rejects_what_mergekit_rejects() {
    let two = "models: [{model: {G}/base}, {model: {G}/other}]\n";
    // max_iter is an int: pydantic takes 3.0 but not 2.5.
    rejected(
        &format!("merge_method: karcher\n{two}parameters: {{max_iter: 2.5}}\n"),
        &[
            "model.embed_tokens.weight",
            "`max_iter` must be an integer, not 2.5",
        ],
    );
    // A gradient interpolates to a fraction at layer 1 (mergekit validates after that).
    rejected(
        &format!("merge_method: karcher\n{two}parameters: {{max_iter: [1, 4]}}\n"),
        &[
            "model.layers.1.input_layernorm.weight",
            "`max_iter` must be an integer",
        ],
    );
    rejected(
        &format!("merge_method: karcher\n{two}parameters: {{tol: abc}}\n"),
        &["`tol` must be a number"],
    );
}

#[test]
fn karcher_takes_integral_floats_and_negative_iterations() {
    // mergekit: max_iter 3.0 is 3; -2 runs no iteration (the normalized weighted mean).
    for v in ["3.0", "-2"] {
        let tmp = tempfile::tempdir().unwrap();
        let yaml = format!(
            "merge_method: karcher\nmodels: [{{model: {{G}}/base}}, {{model: {{G}}/other}}]\nparameters: {{max_iter: {v}}}\ndtype: float32\n"
        );
        let (o, out) = run_config(tmp.path(), &yaml);
        assert!(o.status.success(), "{v}: {}", stderr(&o));
        assert!(out.join("config.json").exists());
    }
}

#[test]
fn multislerp_rejects_what_mergekit_rejects() {
    let weighted = "models: [{model: {G}/base, parameters: {weight: 0.5}}, {model: {G}/other, parameters: {weight: 0.5}}]\n";
    // weight is required for every model but the base.
    rejected(
        "merge_method: multislerp\nmodels: [{model: {G}/base}, {model: {G}/other, parameters: {weight: 0.5}}]\n",
        &["missing required parameter `weight`", "/base"],
    );
    rejected(
        &format!("merge_method: multislerp\n{weighted}parameters: {{normalize_weights: 3}}\n"),
        &["`normalize_weights` must be true or false"],
    );
    rejected(
        &format!("merge_method: multislerp\n{weighted}parameters: {{eps: tiny}}\n"),
        &["`eps` must be a number"],
    );
    // At least one model besides the base.
    rejected(
        "merge_method: multislerp\nbase_model: {G}/base\nmodels: [{model: {G}/base}]\n",
        &["multislerp needs at least one model besides the base"],
    );
}

#[test]
fn multislerp_of_one_model_is_that_model() {
    // mergekit returns the single non-base tensor as it is, even with a base.
    let tmp = tempfile::tempdir().unwrap();
    let yaml = "merge_method: multislerp\nbase_model: {G}/base\nmodels: [{model: {G}/other, parameters: {weight: 0.5}}]\n";
    let (o, out) = run_config(tmp.path(), yaml);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_bit_exact(&out, &golden2().join("models/other"));
}

/// golden2's base, its negation and zeros: unit vectors whose equally weighted mean is zero.
fn antipodal_models(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = load_dir(&golden2().join("models/base"));
    let map = |f: &dyn Fn(u16) -> u16| -> std::collections::BTreeMap<String, Tensor> {
        base.iter()
            .map(|(n, t)| {
                assert_eq!(t.dtype, "F16", "{n}");
                let bytes = t
                    .bytes
                    .chunks_exact(2)
                    .flat_map(|c| f(u16::from_le_bytes([c[0], c[1]])).to_le_bytes())
                    .collect();
                let t = Tensor {
                    dtype: t.dtype.clone(),
                    shape: t.shape.clone(),
                    bytes,
                };
                (n.clone(), t)
            })
            .collect()
    };
    let (a, neg, zero) = (tmp.join("a"), tmp.join("neg"), tmp.join("zero"));
    write_model(&a, &map(&|b| b));
    write_model(&neg, &map(&|b| b ^ 0x8000));
    write_model(&zero, &map(&|_| 0));
    (a, neg, zero)
}

#[test]
fn multislerp_refuses_a_zero_mean_as_mergekit_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, neg, zero) = antipodal_models(tmp.path());
    let m = |p: &Path| format!("{{model: {}, parameters: {{weight: 1.0}}}}", p.display());
    // Three models: mergekit raises "The weighted sum of the input tensors is zero". (In
    // float16 its eps of 1e-8 rounds to 0 and nothing is below it: NaN, not an error.)
    let yaml = format!(
        "merge_method: multislerp\ndtype: float32\nmodels: [{}, {}, {}]\n",
        m(&a),
        m(&neg),
        m(&zero)
    );
    let (o, out) = run_config(tmp.path(), &yaml);
    // Whichever tensor a worker finishes first is named.
    assert_clean_failure(
        &o,
        &out,
        &[".weight: multislerp: the weighted mean", "zero"],
    );
    // Streamed too.
    let (o, out) = run_config_with(tmp.path(), &yaml, &["--memory-limit", "16KiB"]);
    assert_clean_failure(
        &o,
        &out,
        &[".weight: multislerp: the weighted mean", "zero"],
    );
    // Two: it falls back to the linear combination, here exactly zero.
    let yaml = format!(
        "merge_method: multislerp\ndtype: float32\nout_dtype: float16\nmodels: [{}, {}]\n",
        m(&a),
        m(&neg)
    );
    let (o, out) = run_config(tmp.path(), &yaml);
    assert!(o.status.success(), "{}", stderr(&o));
    for (name, t) in load_dir(&out) {
        assert!(
            t.bytes
                .chunks_exact(2)
                .all(|c| c[0] == 0 && c[1] & 0x7f == 0),
            "{name}"
        );
    }
}

/// mergekit computing multislerp, karcher and row-wise nuslerp in float16/bfloat16
/// (tests/fixtures/mergekit_lowp_geometry): every operation rounded to the dtype, and
/// karcher's f32 scalars (norms, cos/sin of the tangent norm) cast to it when they are the
/// left operand of a product, as torch does. All bit-exact.
#[test]
fn low_precision_spherical_methods_match_mergekit() {
    let dir = fixtures().join("mergekit_lowp_geometry");
    let cases = config_cases(&dir);
    assert_eq!(cases.len(), 5);
    for case in cases {
        let d = fixture_case_diff(&golden2(), &dir, &case, &["--out-shard-size", "100K"]);
        assert_eq!(d.differing, 0, "{case}: {d:?}");
    }
}
