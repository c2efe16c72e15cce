//! Parameter lookup as mergekit does it: the first scope (source, slice, top level) whose
//! setting evaluates to a value wins; `{filter, value}` lists pick the first entry whose filter
//! is absent, `*` or a substring of the tensor name; number lists are gradients over the
//! layer's position t in its slice.

use crate::plan::mergekit::config::{ParamValue, Parameters};

/// An evaluated parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Number(f64),
    Bool(bool),
    Text(String),
}

impl Scalar {
    pub fn describe(&self) -> String {
        match self {
            Scalar::Number(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Text(s) => format!("`{s}`"),
        }
    }
}

/// mergekit's `evaluate_setting`.
pub fn evaluate(value: &ParamValue, tensor: &str, t: f64) -> Option<Scalar> {
    match value {
        ParamValue::Number(n) => Some(Scalar::Number(*n)),
        ParamValue::Bool(b) => Some(Scalar::Bool(*b)),
        ParamValue::Text(s) => Some(Scalar::Text(s.clone())),
        ParamValue::Gradient(v) => Some(Scalar::Number(interpolate(v, t))),
        ParamValue::Steps(v) => {
            let i = (t * (v.len() - 1) as f64) as usize;
            evaluate(&v[i.min(v.len() - 1)], tensor, t)
        }
        ParamValue::Filtered(entries) => entries
            .iter()
            .find(|(f, _)| match f.as_deref() {
                None | Some("*") => true,
                Some(f) => tensor.contains(f),
            })
            .and_then(|(_, v)| evaluate(v, tensor, t)),
    }
}

/// `(1 − frac)·v[i0] + frac·v[i1]` with `scaled = t·(L−1)`: mergekit's gradient (np.interp
/// up to the last bit).
pub fn interpolate(v: &[f64], t: f64) -> f64 {
    if v.len() == 1 {
        return v[0];
    }
    let scaled = t * (v.len() - 1) as f64;
    let i0 = (scaled as usize).min(v.len() - 1);
    let i1 = (i0 + 1).min(v.len() - 1);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * v[i0] + frac * v[i1]
}

/// Look `name` up in `scopes` in order.
pub fn resolve(name: &str, scopes: &[Option<&Parameters>], tensor: &str, t: f64) -> Option<Scalar> {
    scopes
        .iter()
        .flatten()
        .filter_map(|p| p.get(name))
        .find_map(|v| evaluate(v, tensor, t))
}

/// Every filter string in a parameter set (to check that each matches some tensor).
pub fn filters(params: &Parameters, out: &mut Vec<String>) {
    fn walk(v: &ParamValue, out: &mut Vec<String>) {
        match v {
            ParamValue::Filtered(entries) => {
                for (f, v) in entries {
                    if let Some(f) = f
                        && f != "*"
                    {
                        out.push(f.clone());
                    }
                    walk(v, out);
                }
            }
            ParamValue::Steps(v) => v.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    for v in params.values() {
        walk(v, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_interpolate_like_mergekit() {
        let v = [0.0, 0.5, 0.3, 0.7, 1.0];
        assert_eq!(interpolate(&v, 0.0), 0.0);
        assert_eq!(interpolate(&v, 1.0), 1.0);
        assert!((interpolate(&v, 0.125) - 0.25).abs() < 1e-15);
        assert_eq!(interpolate(&[1.0, 0.0], 3.0 / 7.0), 1.0 - 3.0 / 7.0);
    }

    #[test]
    fn filters_pick_the_first_match() {
        let v = ParamValue::Filtered(vec![
            (Some("mlp".into()), ParamValue::Gradient(vec![0.0, 1.0])),
            (None, ParamValue::Number(0.5)),
        ]);
        assert_eq!(
            evaluate(&v, "model.layers.0.mlp.up_proj.weight", 0.25),
            Some(Scalar::Number(0.25))
        );
        assert_eq!(
            evaluate(&v, "model.layers.0.self_attn.q_proj.weight", 0.25),
            Some(Scalar::Number(0.5))
        );
        let only = ParamValue::Filtered(vec![(Some("mlp".into()), ParamValue::Number(1.0))]);
        assert_eq!(evaluate(&only, "model.norm.weight", 0.0), None);
    }

    #[test]
    fn scopes_fall_through_when_a_setting_does_not_apply() {
        let mut source = Parameters::new();
        source.insert(
            "weight".into(),
            ParamValue::Filtered(vec![(Some("mlp".into()), ParamValue::Number(2.0))]),
        );
        let mut top = Parameters::new();
        top.insert("weight".into(), ParamValue::Number(1.0));
        let scopes = [Some(&source), None, Some(&top)];
        assert_eq!(
            resolve("weight", &scopes, "a.mlp.b", 0.0),
            Some(Scalar::Number(2.0))
        );
        assert_eq!(
            resolve("weight", &scopes, "a.attn.b", 0.0),
            Some(Scalar::Number(1.0))
        );
        assert_eq!(resolve("density", &scopes, "a.attn.b", 0.0), None);
    }
}
