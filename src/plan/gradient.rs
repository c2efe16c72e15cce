//! Gradient schedules: numpy's `linspace` and BlockMerge_Gradient's per-tensor ratios.

/// `numpy.linspace(start, stop, num)` (endpoint included), reproducing numpy's arithmetic:
/// `i * step + start` with `step = (stop - start) / (num - 1)`, and the last element set to
/// `stop` exactly.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            // numpy divides first when the step underflows to zero.
            for v in &mut y {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in &mut y {
                *v *= step;
            }
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// BlockMerge_Gradient's blend ratios (model2's share) for `n` selected tensors.
///
/// With S = len(values) − 1 sections of P = n // S tensors each, section i contributes
/// `linspace(values[i], values[i+1], P)`; the rest is padded with the last value. One value
/// means a constant gradient.
pub fn blockmerge_ratios(values: &[f64], n: usize) -> Result<Vec<f64>, String> {
    if values.is_empty() {
        return Err("the gradient list is empty".into());
    }
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(format!("the gradient list holds {v}, not a finite number"));
    }
    let values: Vec<f64> = if values.len() == 1 {
        vec![values[0], values[0]]
    } else {
        values.to_vec()
    };
    let sections = values.len() - 1;
    let per_section = n / sections;
    let mut out = Vec::with_capacity(n.max(sections * per_section));
    for w in values.windows(2) {
        out.extend(linspace(w[0], w[1], per_section));
    }
    let last = values[values.len() - 1];
    while out.len() < n {
        out.push(last);
    }
    // Gryphe's list can be longer than n only when n < sections (per_section = 0): it is not.
    out.truncate(n);
    Ok(out)
}

/// Parse a gradient list as users pass it: `[0.9, 0.0]`, `0.9,0.0` or `0.5`
/// (Python literal syntax, as BlockMerge_Gradient's `literal_eval`).
pub fn parse_gradient_list(text: &str) -> Result<Vec<f64>, String> {
    let t = text.trim();
    let inner = t
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .or_else(|| t.strip_prefix('(').and_then(|s| s.strip_suffix(')')))
        .unwrap_or(t);
    let mut out = Vec::new();
    for part in inner.split(',') {
        let p = part.trim();
        if p.is_empty() {
            continue;
        }
        let v: f64 = p
            .parse()
            .map_err(|_| format!("gradient value `{p}` is not a number"))?;
        if !v.is_finite() {
            return Err(format!("gradient value `{p}` is not a finite number"));
        }
        out.push(v);
    }
    if out.is_empty() {
        return Err("the gradient list is empty".into());
    }
    Ok(out)
}

/// A gradient list as users pass it, parsed by [`parse_gradient_list`] (so a command-line
/// parser can check it before anything is opened).
#[derive(Clone, Debug, PartialEq)]
pub struct GradientList(pub Vec<f64>);

impl std::str::FromStr for GradientList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_gradient_list(s).map(GradientList)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy() {
        assert_eq!(linspace(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace(0.3, 0.3, 3), vec![0.3, 0.3, 0.3]);
        assert_eq!(linspace(0.7, 0.1, 1), vec![0.7]);
        assert!(linspace(1.0, 2.0, 0).is_empty());
    }

    #[test]
    fn worked_values_13b_layer_only() {
        let r = blockmerge_ratios(&[0.9, 0.0, 0.0, 0.0], 360).unwrap();
        assert_eq!(r.len(), 360);
        assert_eq!(r[0], 0.9);
        assert_eq!(r[1], 0.892436974789916);
        assert_eq!(r[118], 0.007563025210084007);
        assert!(r[119..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn worked_values_all_keys() {
        let r = blockmerge_ratios(&[1.0, 0.5, 0.0], 363).unwrap();
        assert_eq!(r.len(), 363);
        assert_eq!(r[180], 0.5);
        assert_eq!(r[181], 0.5);
        assert_eq!(r[361], 0.0);
        assert_eq!(r[362], 0.0);
    }

    #[test]
    fn single_value_and_errors() {
        assert_eq!(blockmerge_ratios(&[0.5], 3).unwrap(), vec![0.5; 3]);
        assert!(blockmerge_ratios(&[], 3).is_err());
        assert!(blockmerge_ratios(&[f64::NAN, 1.0], 3).is_err());
        // more sections than tensors: everything is the last value
        assert_eq!(blockmerge_ratios(&[0.1, 0.2, 0.3], 1).unwrap(), vec![0.3]);
    }

    #[test]
    fn parses_lists() {
        assert_eq!(parse_gradient_list("[0.9, 0.0]").unwrap(), vec![0.9, 0.0]);
        assert_eq!(parse_gradient_list("0.5").unwrap(), vec![0.5]);
        assert_eq!(parse_gradient_list("1,0.5,0").unwrap(), vec![1.0, 0.5, 0.0]);
        assert!(parse_gradient_list("[]").is_err());
        assert!(parse_gradient_list("[0.9, x]").is_err());
        assert!(parse_gradient_list("[nan]").is_err());
    }
}
