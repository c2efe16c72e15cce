//! `mergestream merge CONFIG.yml OUT`: mergekit YAML configs, planned for streaming
//! (DESIGN §5.3, with the numerics in `methods::mergekit`).
//!
//! The planner follows mergekit's MergePlanner: `models:` becomes one slice over all layers
//! (the base appended if not listed); pre-layer weights use slice 0 and t = 0, post-layer
//! weights the last slice and t = 0; layer tensors get t = offset/(len−1) within their slice
//! and are renumbered in output order. Parameters are looked up source → slice → top level.

pub mod arch;
pub mod config;
pub mod params;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::plan::blockmerge::place;
use crate::plan::lora::{AdapterEffect, open_adapter, resolve as resolve_lora};
use crate::plan::outputs::{OutputFiles, TOKENIZER_FILES, with_dtype};
use crate::plan::{Method, Operand, Plan, Recipe, Step, TensorRef};
use crate::source::Source;
use arch::{Architecture, known};
use config::{MergeConfig, ModelRef, Parameters};
use params::{Scalar, filters, resolve};

/// How sparse deltas are made in the task-arithmetic family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// TIES: keep the top-k by magnitude.
    Magnitude,
    /// Breadcrumbs: drop the largest gamma·N and the smallest, keep density·N.
    MagnitudeOutliers,
    /// DARE: Bernoulli(density) masks.
    Random,
    /// DELLA: Bernoulli masks whose probability rises with the magnitude rank in the row.
    Della,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodKind {
    Linear,
    Slerp,
    NuSlerp,
    ModelStock,
    Passthrough,
    TaskArithmetic { consensus: bool, sparsify: Sparsify },
}

/// Per-input parameters, resolved for one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct InputParams {
    pub weight: f64,
    pub density: f64,
    pub gamma: f64,
    pub epsilon: f64,
    pub scale: Option<f64>,
}

/// Everything a mergekit method needs for one output tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct MergekitRecipe {
    pub kind: MethodKind,
    /// Operand index of the base model.
    pub base: Option<usize>,
    /// The dtype mergekit computes in (its "D"): the config dtype or the promoted inputs'.
    pub compute: DType,
    pub inputs: Vec<InputParams>,
    pub t: f64,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f64,
    pub filter_wise: bool,
    pub flatten: bool,
    pub row_wise: bool,
    /// Seed of the random masks (DARE, DELLA) for this tensor.
    pub seed: u64,
}

impl MergekitRecipe {
    /// Whether the method works element by element (so row chunks are independent).
    pub fn elementwise(&self) -> bool {
        match self.kind {
            MethodKind::Linear | MethodKind::Passthrough => true,
            MethodKind::TaskArithmetic { sparsify, .. } => sparsify == Sparsify::None,
            _ => false,
        }
    }
}

struct MethodInfo {
    kind: MethodKind,
    needs_base: bool,
    normalize: bool,
    rescale: bool,
}

fn method_info(name: &str) -> Option<MethodInfo> {
    use MethodKind::*;
    use Sparsify as S;
    let ta = |consensus, sparsify, normalize, rescale| MethodInfo {
        kind: TaskArithmetic {
            consensus,
            sparsify,
        },
        needs_base: true,
        normalize,
        rescale,
    };
    Some(match name {
        "linear" => MethodInfo {
            kind: Linear,
            needs_base: false,
            normalize: true,
            rescale: false,
        },
        "slerp" => MethodInfo {
            kind: Slerp,
            needs_base: true,
            normalize: false,
            rescale: false,
        },
        "nuslerp" => MethodInfo {
            kind: NuSlerp,
            needs_base: false,
            normalize: false,
            rescale: false,
        },
        "model_stock" => MethodInfo {
            kind: ModelStock,
            needs_base: true,
            normalize: false,
            rescale: false,
        },
        "passthrough" => MethodInfo {
            kind: Passthrough,
            needs_base: false,
            normalize: false,
            rescale: false,
        },
        "task_arithmetic" => ta(false, S::None, false, false),
        "ties" => ta(true, S::Magnitude, true, false),
        "dare_ties" => ta(true, S::Random, false, true),
        "dare_linear" => ta(false, S::Random, false, true),
        "breadcrumbs" => ta(false, S::MagnitudeOutliers, false, false),
        "breadcrumbs_ties" => ta(true, S::MagnitudeOutliers, false, false),
        "della" => ta(true, S::Della, true, true),
        "della_linear" => ta(false, S::Della, false, true),
        _ => return None,
    })
}

const METHODS: &str = "linear, slerp, nuslerp, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, passthrough";

/// Options of `mergestream merge` beyond the config itself.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub config_path: PathBuf,
    pub max_shard_size: u64,
    pub allow_crimes: bool,
    pub copy_tokenizer: bool,
    pub write_model_card: bool,
    pub random_seed: u64,
    /// Cut vocabulary tensors to the smallest input's rows (mergekit's
    /// `--unsafe-truncate-embeddings`).
    pub truncate_embeddings: bool,
    /// Overrides the config's `out_dtype` (`--out-dtype`).
    pub out_dtype: Option<DType>,
}

/// One model as the plan uses it.
struct Input {
    reference: ModelRef,
    source: usize,
    effect: Option<AdapterEffect>,
    config: Option<serde_json::Value>,
    layers: u64,
}

/// One output tensor: its inputs (model index, input tensor name), t, and slice.
struct Planned<'a> {
    out: String,
    inputs: Vec<(usize, String)>,
    t: f64,
    slice: &'a Slice<'a>,
}

/// A normalized slice: sources (model index, first layer, parameters), shared parameters.
struct Slice<'a> {
    sources: Vec<(usize, u64, Option<&'a Parameters>)>,
    len: u64,
    params: Option<&'a Parameters>,
    base: Option<usize>,
}

fn cfg_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::invalid(msg).in_file(path)
}

pub fn plan_merge(opts: &MergeOptions) -> Result<Plan> {
    let path = &opts.config_path;
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", e).in_file(path))?;
    let cfg =
        MergeConfig::parse(&text).map_err(|e| cfg_err(path, format!("invalid config: {e}")))?;
    let info = method_info(&cfg.merge_method).ok_or_else(|| {
        cfg_err(
            path,
            format!(
                "unknown merge_method `{}` (known: {METHODS})",
                cfg.merge_method
            ),
        )
    })?;
    match (&cfg.models, &cfg.slices) {
        (Some(_), Some(_)) => {
            return Err(cfg_err(path, "give either `models` or `slices`, not both"));
        }
        (None, None) if cfg.modules.is_some() => {
            return Err(cfg_err(
                path,
                "`modules` configs are not supported yet; use `models` or `slices`",
            ));
        }
        (None, None) => return Err(cfg_err(path, "the config needs `models` or `slices`")),
        _ => {}
    }
    if cfg.modules.is_some() {
        return Err(cfg_err(
            path,
            "`modules` configs are not supported yet; use `models` or `slices`",
        ));
    }
    if cfg.tokenizer.is_some() {
        return Err(cfg_err(
            path,
            "`tokenizer` (token surgery) is not supported yet",
        ));
    }
    if cfg.tokenizer_source.as_deref() == Some("union") {
        return Err(cfg_err(
            path,
            "`tokenizer_source: union` (vocabulary union) is not supported yet",
        ));
    }
    let dtype = parse_dtype(path, "dtype", cfg.dtype.as_deref())?;
    let out_dtype = match opts.out_dtype {
        Some(d) => Some(d),
        None => parse_dtype(path, "out_dtype", cfg.out_dtype.as_deref())?,
    };

    // Every model the config names, opened once.
    let mut refs: Vec<ModelRef> = Vec::new();
    let mut note = |r: &ModelRef| {
        if !refs.contains(r) {
            refs.push(r.clone());
        }
    };
    for m in cfg.models.iter().flatten() {
        note(&m.model);
    }
    for s in cfg.slices.iter().flatten() {
        for src in &s.sources {
            note(&src.model);
        }
        if let Some(b) = &s.base_model {
            note(b);
        }
    }
    if let Some(b) = &cfg.base_model {
        note(b);
    }
    if refs.is_empty() {
        return Err(cfg_err(path, "the config names no models"));
    }
    let mut sources: Vec<Model> = Vec::new();
    let mut inputs: Vec<Input> = Vec::new();
    for r in &refs {
        let model = Model::open(&r.path)?;
        let config = model.config()?;
        sources.push(model);
        inputs.push(Input {
            reference: r.clone(),
            source: sources.len() - 1,
            effect: None,
            config,
            layers: 0,
        });
    }
    for i in 0..inputs.len() {
        if let Some(lora) = inputs[i].reference.lora.clone() {
            let adapter = open_adapter(&lora)?;
            let idx = sources.len();
            let effect = resolve_lora(
                &adapter,
                idx,
                inputs[i].reference.lora_weight,
                &sources[inputs[i].source],
            )?;
            sources.push(adapter.model);
            inputs[i].effect = Some(effect);
        }
    }
    let index_of = |r: &ModelRef| refs.iter().position(|x| x == r).unwrap_or(0);
    let base = cfg.base_model.as_ref().map(index_of);

    // Architecture: the base's (or first model's); all must agree unless --allow-crimes.
    let donor = base.unwrap_or(0);
    let arch_of = |i: usize| inputs[i].config.as_ref().and_then(known);
    let arch: Architecture = match arch_of(donor) {
        Some(a) => {
            for (i, inp) in inputs.iter().enumerate() {
                let other = arch_of(i)
                    .map(|x| x.name)
                    .unwrap_or_else(|| "unknown".into());
                if other != a.name && !opts.allow_crimes {
                    return Err(cfg_err(
                        path,
                        format!(
                            "{} is {other} but {} is {}; pass --allow-crimes to merge different architectures",
                            inp.reference, inputs[donor].reference, a.name
                        ),
                    ));
                }
            }
            a
        }
        None => {
            let models: Vec<&Model> = inputs.iter().map(|i| &sources[i.source]).collect();
            arch::infer(&models)
        }
    };
    for inp in inputs.iter_mut() {
        inp.layers = arch::layer_count(&sources[inp.source], inp.config.as_ref(), &arch);
    }

    // Slices.
    let mut slices: Vec<Slice<'_>> = Vec::new();
    if let Some(models) = &cfg.models {
        let mut srcs: Vec<(usize, u64, Option<&Parameters>)> = models
            .iter()
            .map(|m| (index_of(&m.model), 0, m.parameters.as_ref()))
            .collect();
        if let Some(b) = base
            && !srcs.iter().any(|s| s.0 == b)
        {
            srcs.push((b, 0, None));
        }
        let len = inputs[srcs[0].0].layers;
        for s in &srcs {
            if inputs[s.0].layers != len {
                return Err(cfg_err(
                    path,
                    format!(
                        "{} has {} layers but {} has {len}; use `slices` to merge models of different depths",
                        inputs[s.0].reference, inputs[s.0].layers, inputs[srcs[0].0].reference
                    ),
                ));
            }
        }
        slices.push(Slice {
            sources: srcs,
            len,
            params: None,
            base,
        });
    } else {
        for (si, s) in cfg.slices.iter().flatten().enumerate() {
            if s.sources.is_empty() {
                return Err(cfg_err(path, format!("slice {si} has no sources")));
            }
            let mut srcs = Vec::new();
            let mut len = None;
            for src in &s.sources {
                let m = index_of(&src.model);
                let [a, b] = src.layer_range;
                let layers = inputs[m].layers;
                if a < 0 || b <= a || b as u64 > layers {
                    return Err(cfg_err(
                        path,
                        format!(
                            "slice {si}: layer_range [{a}, {b}] of {} is outside its {layers} layers",
                            src.model
                        ),
                    ));
                }
                let n = (b - a) as u64;
                match len {
                    None => len = Some(n),
                    Some(l) if l != n => {
                        return Err(cfg_err(
                            path,
                            format!(
                                "slice {si}: sources cover different numbers of layers ({l} and {n})"
                            ),
                        ));
                    }
                    _ => {}
                }
                srcs.push((m, a as u64, src.parameters.as_ref()));
            }
            let slice_base = s.base_model.as_ref().map(index_of).or(base);
            slices.push(Slice {
                sources: srcs,
                len: len.unwrap_or(0),
                params: s.parameters.as_ref(),
                base: slice_base,
            });
        }
    }
    for (si, s) in slices.iter().enumerate() {
        check_method_inputs(path, &cfg.merge_method, &info, si, s, &inputs)?;
    }

    // The output tensors, in mergekit's plan order.
    let mut planned: Vec<Planned<'_>> = Vec::new();
    let weight_inputs = |slice: &Slice<'_>, w: &arch::Weight| -> Option<Vec<(usize, String)>> {
        let has = |m: usize, n: &str| sources[inputs[m].source].get(n).is_some();
        if w.optional && !slice.sources.iter().any(|s| has(s.0, &w.name)) {
            return None;
        }
        Some(
            slice
                .sources
                .iter()
                .map(|s| {
                    let name = match &w.tied_to {
                        Some(t) if !has(s.0, &w.name) && has(s.0, t) => t.clone(),
                        _ => w.name.clone(),
                    };
                    (s.0, name)
                })
                .collect(),
        )
    };
    if let Some(first) = slices.first() {
        for w in &arch.pre {
            if let Some(ins) = weight_inputs(first, w) {
                planned.push(Planned {
                    out: w.name.clone(),
                    inputs: ins,
                    t: 0.0,
                    slice: first,
                });
            }
        }
    }
    let mut out_layer = 0u64;
    for s in &slices {
        for idx in 0..s.len {
            let t = if s.len > 1 {
                idx as f64 / (s.len - 1) as f64
            } else {
                1.0
            };
            for tpl in &arch.layer_templates {
                let ins = s
                    .sources
                    .iter()
                    .map(|src| (src.0, tpl.replacen("{}", &(src.1 + idx).to_string(), 1)))
                    .collect();
                planned.push(Planned {
                    out: tpl.replacen("{}", &out_layer.to_string(), 1),
                    inputs: ins,
                    t,
                    slice: s,
                });
            }
            out_layer += 1;
        }
    }
    if let Some(last) = slices.last() {
        for w in &arch.post {
            if let Some(ins) = weight_inputs(last, w) {
                planned.push(Planned {
                    out: w.name.clone(),
                    inputs: ins,
                    t: 0.0,
                    slice: last,
                });
            }
        }
    }

    // Every {filter, value} must match some tensor: a filter that matches nothing is a typo.
    let mut all_filters = Vec::new();
    for p in [cfg.parameters.as_ref()]
        .into_iter()
        .chain(slices.iter().map(|s| s.params))
        .chain(slices.iter().flat_map(|s| s.sources.iter().map(|x| x.2)))
        .flatten()
    {
        filters(p, &mut all_filters);
    }
    for f in &all_filters {
        let hit = planned.iter().any(|p| {
            p.out.contains(f.as_str()) || p.inputs.iter().any(|(_, n)| n.contains(f.as_str()))
        });
        if !hit {
            return Err(cfg_err(
                path,
                format!("filter `{f}` matches no tensor of the models"),
            ));
        }
    }

    let top = cfg.parameters.as_ref();
    let mut steps = Vec::with_capacity(planned.len());
    let mut write_key: Vec<(String, usize)> = Vec::with_capacity(planned.len());
    for (pi, p) in planned.iter().enumerate() {
        let mut operands = Vec::with_capacity(p.inputs.len());
        let mut shape: Option<Vec<u64>> = None;
        let mut in_dtypes = Vec::new();
        let mut first_computable: Option<bool> = None;
        for (m, name) in &p.inputs {
            let inp = &inputs[*m];
            let model = &sources[inp.source];
            let Some(idx) = model.index_of(name) else {
                return Err(
                    Error::invalid(format!("{} has no tensor `{name}`", inp.reference))
                        .at_tensor(&p.out)
                        .in_file(path),
                );
            };
            let t = model.tensor(idx);
            let mut op = inp
                .effect
                .as_ref()
                .and_then(|e| e.operand(model, inp.source, name))
                .unwrap_or_else(|| {
                    Operand::plain(
                        TensorRef {
                            source: inp.source,
                            tensor: idx,
                        },
                        t.rows(),
                    )
                });
            let patched = !op.patches.is_empty() || op.load_as.is_some();
            if patched {
                op.roundings.push(t.dtype); // mergekit saves the PEFT merge in the checkpoint dtype
            }
            // mergekit casts every input to `dtype` at load.
            if let Some(d) = dtype
                && t.dtype.is_computable()
                && (d != t.dtype || patched)
            {
                op.roundings.push(d);
            }
            // All inputs float, or all not (those pass through): never decode ints as floats.
            let float = t.dtype.is_computable();
            if *first_computable.get_or_insert(float) != float {
                return Err(Error::invalid(format!(
                    "{} stores it as {}; float and non-float tensors cannot be merged",
                    inp.reference, t.dtype
                ))
                .at_tensor(&p.out)
                .in_file(path));
            }
            in_dtypes.push(t.dtype);
            match &shape {
                None => shape = Some(t.shape.clone()),
                Some(s) if *s != t.shape => {
                    if opts.truncate_embeddings
                        && s.len() == 2
                        && t.shape.len() == 2
                        && s[1] == t.shape[1]
                    {
                        let rows = s[0].min(t.shape[0]);
                        shape = Some(vec![rows, s[1]]);
                    } else {
                        return Err(Error::invalid(format!(
                            "tensor size mismatch: {s:?} vs {:?} in {}; models with different vocabularies need --unsafe-truncate-embeddings (tokenizer merging is not supported yet)",
                            t.shape, inp.reference
                        ))
                        .at_tensor(&p.out)
                        .in_file(path));
                    }
                }
                _ => {}
            }
            operands.push(op);
        }
        let shape = shape.unwrap_or_default();
        let rows = shape.first().copied().unwrap_or(1);
        for op in &mut operands {
            op.rows = op.rows.min(rows);
        }
        let promoted = promote(&in_dtypes);
        let compute = dtype.unwrap_or(promoted);
        let first = &sources[operands[0].tensor.source].tensor(operands[0].tensor.tensor);
        let out_dt = if first.dtype.is_computable() {
            out_dtype.or(dtype).unwrap_or(promoted)
        } else {
            first.dtype
        };
        let recipe = if !first.dtype.is_computable() {
            // mergekit passes non-float buffers through.
            Recipe::Copy(operands[0].tensor)
        } else {
            let r = tensor_recipe(path, &info, p, &inputs, top, compute, opts.random_seed)?;
            Recipe::Compute {
                operands,
                method: Method::Mergekit(Box::new(r)),
            }
        };
        steps.push(Step::new(p.out.clone(), out_dt, shape, recipe));
        // mergekit writes in order of the (largest) input tensor name, ties in plan order.
        let key = p
            .inputs
            .iter()
            .map(|(_, n)| n.clone())
            .max()
            .unwrap_or_default();
        write_key.push((key, pi));
    }
    write_key.sort();
    let mut ordered: Vec<Step> = Vec::with_capacity(steps.len());
    let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
    for (_, i) in write_key {
        if let Some(s) = slots[i].take() {
            ordered.push(s);
        }
    }
    let mut steps = ordered;
    let shards = place(&mut steps, opts.max_shard_size);

    let outputs = output_files(
        opts,
        &cfg,
        &text,
        &inputs,
        &sources,
        donor,
        &slices,
        out_layer,
        out_dtype.or(dtype),
    )?;
    Ok(Plan {
        title: format!("merge {} ({})", path.display(), cfg.merge_method),
        sources,
        steps,
        shards,
        outputs,
    })
}

fn parse_dtype(path: &Path, key: &str, v: Option<&str>) -> Result<Option<DType>> {
    v.map(|s| {
        DType::parse_float(s).ok_or_else(|| {
            cfg_err(
                path,
                format!("`{key}: {s}` is not a float dtype (float16, bfloat16, float32)"),
            )
        })
    })
    .transpose()
}

/// torch.promote_types over the inputs' dtypes.
fn promote(dtypes: &[DType]) -> DType {
    let mut out: Option<DType> = None;
    for &d in dtypes.iter().filter(|d| d.is_computable()) {
        out = Some(match out {
            None => d,
            Some(o) if o == d => o,
            Some(DType::F64) | Some(_) if d == DType::F64 => DType::F64,
            Some(DType::F64) => DType::F64,
            Some(_) => DType::F32,
        });
    }
    out.unwrap_or(DType::F32)
}

fn check_method_inputs(
    path: &Path,
    method: &str,
    info: &MethodInfo,
    si: usize,
    s: &Slice<'_>,
    inputs: &[Input],
) -> Result<()> {
    let n = s.sources.len();
    let has_base = s.base.is_some_and(|b| s.sources.iter().any(|x| x.0 == b));
    let non_base = s.sources.iter().filter(|x| Some(x.0) != s.base).count();
    if info.needs_base && s.base.is_none() {
        return Err(cfg_err(
            path,
            format!("merge_method {method} needs a base_model"),
        ));
    }
    if info.needs_base && !has_base {
        let b = s
            .base
            .map(|b| inputs[b].reference.to_string())
            .unwrap_or_default();
        return Err(cfg_err(
            path,
            format!("slice {si}: base_model {b} is not one of its sources"),
        ));
    }
    let bad = match info.kind {
        MethodKind::Slerp if n != 2 => {
            Some("slerp merges exactly two models (the base and one other)".to_string())
        }
        MethodKind::NuSlerp if non_base != 2 => {
            Some("nuslerp merges exactly two models besides the base".into())
        }
        MethodKind::ModelStock if non_base < 2 => {
            Some("model_stock needs at least two models besides the base".into())
        }
        MethodKind::Passthrough if n != 1 => {
            Some("passthrough takes exactly one source per slice".into())
        }
        _ => None,
    };
    match bad {
        Some(msg) => Err(cfg_err(path, format!("slice {si}: {msg}"))),
        None => Ok(()),
    }
}

fn number(path: &Path, tensor: &str, name: &str, v: Option<Scalar>) -> Result<Option<f64>> {
    match v {
        None => Ok(None),
        Some(Scalar::Number(n)) => Ok(Some(n)),
        Some(other) => Err(Error::invalid(format!(
            "parameter `{name}` must be a number, not {}",
            other.describe()
        ))
        .at_tensor(tensor)
        .in_file(path)),
    }
}

fn flag(path: &Path, tensor: &str, name: &str, v: Option<Scalar>, default: bool) -> Result<bool> {
    match v {
        None => Ok(default),
        Some(Scalar::Bool(b)) => Ok(b),
        Some(Scalar::Number(n)) if n == 0.0 || n == 1.0 => Ok(n == 1.0),
        Some(other) => Err(Error::invalid(format!(
            "parameter `{name}` must be true or false, not {}",
            other.describe()
        ))
        .at_tensor(tensor)
        .in_file(path)),
    }
}

fn tensor_recipe(
    path: &Path,
    info: &MethodInfo,
    p: &Planned<'_>,
    inputs: &[Input],
    top: Option<&Parameters>,
    compute: DType,
    seed: u64,
) -> Result<MergekitRecipe> {
    let slice = p.slice;
    // Shared parameters are looked up with no model and filtered on the output name.
    let shared = [slice.params, top];
    let sh = |name: &str| resolve(name, &shared, &p.out, p.t);
    let base = p.inputs.iter().position(|(m, _)| Some(*m) == slice.base);
    let per_input_weight = matches!(info.kind, MethodKind::Linear);
    let mut params = Vec::with_capacity(p.inputs.len());
    for (i, (m, in_name)) in p.inputs.iter().enumerate() {
        // Per-input parameters: this model's sources in the slice, then the slice, then the
        // top level, filtered on the input tensor's name.
        let mut scopes: Vec<Option<&Parameters>> = slice
            .sources
            .iter()
            .filter(|s| s.0 == *m)
            .map(|s| s.2)
            .collect();
        scopes.push(slice.params);
        scopes.push(top);
        let get = |name: &str| number(path, &p.out, name, resolve(name, &scopes, in_name, p.t));
        let is_base = Some(i) == base;
        let needs_weight = match info.kind {
            MethodKind::Linear => true,
            MethodKind::NuSlerp | MethodKind::TaskArithmetic { .. } => !is_base,
            _ => false,
        };
        let weight = get("weight")?;
        if needs_weight && weight.is_none() {
            return Err(Error::invalid(format!(
                "missing required parameter `weight` for {}",
                inputs[*m].reference
            ))
            .at_tensor(&p.out)
            .in_file(path));
        }
        let _ = per_input_weight;
        params.push(InputParams {
            weight: weight.unwrap_or(1.0),
            density: get("density")?.unwrap_or(1.0),
            gamma: get("gamma")?.unwrap_or(0.01),
            epsilon: get("epsilon")?.unwrap_or(0.15),
            scale: get("scale")?,
        });
    }
    let t = number(path, &p.out, "t", sh("t"))?;
    if info.kind == MethodKind::Slerp && t.is_none() {
        return Err(Error::invalid("missing required parameter `t` for slerp")
            .at_tensor(&p.out)
            .in_file(path));
    }
    let recipe = MergekitRecipe {
        kind: info.kind,
        base,
        compute,
        t: t.unwrap_or(0.5),
        normalize: flag(path, &p.out, "normalize", sh("normalize"), info.normalize)?,
        rescale: flag(path, &p.out, "rescale", sh("rescale"), info.rescale)?,
        lambda: number(path, &p.out, "lambda", sh("lambda"))?.unwrap_or(1.0),
        filter_wise: flag(path, &p.out, "filter_wise", sh("filter_wise"), false)?,
        flatten: flag(path, &p.out, "nuslerp_flatten", sh("nuslerp_flatten"), true)?,
        row_wise: flag(
            path,
            &p.out,
            "nuslerp_row_wise",
            sh("nuslerp_row_wise"),
            false,
        )?,
        seed: seed_for(seed, &p.out),
        inputs: params,
    };
    if let MethodKind::TaskArithmetic {
        sparsify: Sparsify::Della,
        ..
    } = recipe.kind
    {
        for (i, ip) in recipe.inputs.iter().enumerate() {
            if Some(i) != base
                && ip.density < 1.0
                && ip.density > 0.0
                && (ip.density + ip.epsilon >= 1.0 || ip.density - ip.epsilon <= 0.0)
            {
                return Err(Error::invalid(format!(
                    "della needs density ± epsilon inside (0, 1); got density {} and epsilon {}",
                    ip.density, ip.epsilon
                ))
                .at_tensor(&p.out)
                .in_file(path));
            }
        }
    }
    Ok(recipe)
}

/// A per-tensor seed: the run's seed mixed with the tensor name (FNV-1a), so masks do not
/// depend on the order tensors are processed in.
fn seed_for(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// config.json (dtype, layer count), tokenizer files, mergekit_config.yml and the model card.
#[allow(clippy::too_many_arguments)]
fn output_files(
    opts: &MergeOptions,
    cfg: &MergeConfig,
    text: &str,
    inputs: &[Input],
    sources: &[Model],
    donor: usize,
    slices: &[Slice<'_>],
    out_layers: u64,
    dtype: Option<DType>,
) -> Result<OutputFiles> {
    let donor_files = sources[inputs[donor].source].source.clone();
    let mut config = inputs[donor].config.clone();
    if let (Some(c), Some(d)) = (config.take(), dtype) {
        config = Some(with_dtype(c, d));
    } else {
        config = inputs[donor].config.clone();
    }
    if cfg.slices.is_some()
        && let Some(serde_json::Value::Object(map)) = config.as_mut()
        && map.contains_key("num_hidden_layers")
    {
        map.insert("num_hidden_layers".into(), out_layers.into());
    }
    let _ = slices;
    let mut out = OutputFiles {
        config,
        ..OutputFiles::default()
    };
    // Tokenizer: tokenizer_source names base or a model; otherwise the donor's files.
    let tok_dir: Option<Arc<dyn Source>> = match cfg.tokenizer_source.as_deref() {
        Some("base") => Some(donor_files.clone()),
        Some(other) => {
            let r = ModelRef::parse(other).map_err(|e| cfg_err(&opts.config_path, e))?;
            match inputs.iter().find(|i| i.reference.path == r.path) {
                Some(i) => Some(sources[i.source].source.clone()),
                None => {
                    return Err(cfg_err(
                        &opts.config_path,
                        format!("tokenizer_source `{other}` is not one of the merged models"),
                    ));
                }
            }
        }
        None if opts.copy_tokenizer => Some(donor_files.clone()),
        None => None,
    };
    if let Some(dir) = tok_dir {
        out.copy_present(&dir, TOKENIZER_FILES);
        out.copy_present(&dir, &["generation_config.json"]);
    }
    if let Some(template) = &cfg.chat_template {
        let tpl = chat_template(template, inputs, sources).ok_or_else(|| {
            cfg_err(
                &opts.config_path,
                if template == "auto" {
                    "chat_template auto: no model's tokenizer_config.json has a chat_template".to_string()
                } else {
                    format!("unknown chat_template `{template}` (chatml, llama3, alpaca, auto, or Jinja text)")
                },
            )
        })?;
        let mut v: serde_json::Value = match out.read_copy("tokenizer_config.json")? {
            Some((p, t)) => serde_json::from_slice(&t)
                .map_err(|e| Error::invalid(format!("not valid JSON: {e}")).in_file(&p))?,
            None => serde_json::json!({}),
        };
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("chat_template".into(), tpl.into());
        }
        out.copies.retain(|(_, n)| n != "tokenizer_config.json");
        out.generated.push((
            "tokenizer_config.json".into(),
            crate::plan::outputs::config_bytes(&v),
        ));
    }
    if opts.write_model_card {
        out.generated
            .push(("mergekit_config.yml".into(), text.as_bytes().to_vec()));
        out.generated.push((
            "README.md".into(),
            model_card(cfg, text, inputs).into_bytes(),
        ));
    }
    Ok(out)
}

/// A chat template by mergekit's names, `auto` (the inputs' most common), or Jinja text.
fn chat_template(name: &str, inputs: &[Input], sources: &[Model]) -> Option<String> {
    match name {
        "chatml" => Some(CHATML.to_string()),
        "llama3" => Some(LLAMA3.to_string()),
        "alpaca" => Some(ALPACA.to_string()),
        "auto" => {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for i in inputs {
                let Ok(Some(t)) = sources[i.source].read_file("tokenizer_config.json") else {
                    continue;
                };
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&t)
                    && let Some(s) = v.get("chat_template").and_then(|s| s.as_str())
                {
                    *counts.entry(s.to_string()).or_default() += 1;
                }
            }
            counts.into_iter().max_by_key(|(_, c)| *c).map(|(t, _)| t)
        }
        t if t.contains("{%") || t.contains("{{") => Some(t.to_string()),
        _ => None,
    }
}

// The standard chat formats, written out for mergekit's template names.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
const ALPACA: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] | trim + '\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim + eos_token + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}";

fn model_card(cfg: &MergeConfig, text: &str, inputs: &[Input]) -> String {
    let mut s = String::new();
    s.push_str("---\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n- mergestream\n---\n");
    s.push_str("# Merged model\n\nThis model was merged with [mergestream](https://github.com/) from a mergekit configuration.\n\n");
    s.push_str(&format!("## Merge method\n\n`{}`", cfg.merge_method));
    if let Some(b) = &cfg.base_model {
        s.push_str(&format!(", with {b} as the base"));
    }
    s.push_str(".\n\n## Models merged\n\n");
    for i in inputs {
        s.push_str(&format!("- {}\n", i.reference));
    }
    s.push_str("\n## Configuration\n\n```yaml\n");
    s.push_str(text);
    if !text.ends_with('\n') {
        s.push('\n');
    }
    s.push_str("```\n");
    s
}
