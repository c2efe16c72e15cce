//! Where every row of an aligned embedding (or LM head) comes from, as mergekit 0.1.5's
//! `PermutedVocabulary` (tokenizer/embed.py) decides it — as data, so the pipeline can build
//! the rows of each model's aligned tensor chunk by chunk without holding the tensor.
//!
//! For one vocabulary tensor merged from some models ("slots", in the order the pipeline
//! holds them), model `s`'s aligned row for output token `t` is:
//! - [`RowSource::Row`]: its own row, when it has the token and the token is not `force`d;
//! - else [`RowSource::Default`]: the token's default row, shared by every model lacking it:
//!   - a token in `tokens:` uses its source: `zero`, a model's row of this token, or
//!     `model_token` (a model's row by token text or id);
//!   - otherwise (assign_embedding_sources): the only donor's row when one model has it; the
//!     base's row when the base (the config's `base_model`, if it is among the slots) has it;
//!     the average of the rows of the models that have it; zero when no model has it;
//! - else [`RowSource::Missing`]: no source (a `tokens:` entry that every model has,
//!   forced without a source is an error; this only covers mergekit's logged
//!   "No embedding for token" case): the row stays zero;
//! - rows past the token count ([`RowSource::Pad`]) are the mean of this model's first
//!   `tokens.len()` aligned rows (pad_to_multiple_of).
//!
//! Arithmetic notes for the executor: mergekit gathers the tensors in the merge's `dtype`
//! (promoted across models) and computes an average as `((0 + r1) + r2 + ...) / count`, in
//! slot order; the pad mean is `torch.mean` over the aligned rows.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::tokenizer::config::{TokenConfig, TokenRef, TokenSource, TokenizerSpec};
use crate::tokenizer::vocab::TokenizerInfo;

/// A default row shared by the models lacking a token. `slot`s index the `slots` given to
/// [`embedding_plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultRow {
    /// Row `row` of the (unaligned) tensor of model `slot`.
    Copy {
        slot: usize,
        row: u32,
    },
    /// The mean of these rows, summed in this order.
    Average(Vec<(usize, u32)>),
    Zero,
}

/// Where one aligned row of one model comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowSource {
    /// This row of the model's own tensor.
    Row(u32),
    /// `EmbeddingPlan::defaults[k]`.
    Default(usize),
    /// No source at all: zeros (mergekit logs an error and leaves the row zero).
    Missing,
    /// Padding: the mean of this model's aligned rows `0..EmbeddingPlan::tokens`.
    Pad,
}

/// One model of the tensor: its index in [`TokenizerInfo::models`] and its tensor's row count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub model: usize,
    pub rows: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingPlan {
    /// Real token rows; rows `tokens..vocab_size` are padding.
    pub tokens: usize,
    /// Rows of every aligned tensor.
    pub vocab_size: usize,
    pub defaults: Vec<DefaultRow>,
    /// `rows[slot][row]` for row < `tokens`.
    pub rows: Vec<Vec<RowSource>>,
}

impl EmbeddingPlan {
    /// Where aligned row `row` of slot `slot` comes from.
    pub fn source(&self, slot: usize, row: usize) -> RowSource {
        if row >= self.tokens {
            return RowSource::Pad;
        }
        self.rows
            .get(slot)
            .and_then(|r| r.get(row))
            .copied()
            .unwrap_or(RowSource::Missing)
    }

    /// Whether aligned rows are exactly the model's own rows 0..n (no permutation, no
    /// defaults, no padding): the tensor can stream unchanged.
    pub fn is_identity(&self, slot: usize, rows: usize) -> bool {
        self.vocab_size == rows
            && self.tokens == rows
            && self.rows.get(slot).is_some_and(|r| {
                r.iter()
                    .enumerate()
                    .all(|(i, s)| *s == RowSource::Row(i as u32))
            })
    }
}

/// A token's resolved source: from `tokens:`, or assigned by the rules above.
enum Assigned<'a> {
    Configured(&'a TokenConfig),
    Slot(usize),
    Zero,
    Average,
}

/// The plan for one vocabulary tensor merged from `slots`; `base` is the config's
/// `base_model` (an index into `info.models`), if any. Errors name the token and model.
pub fn embedding_plan(
    info: &TokenizerInfo,
    spec: &TokenizerSpec,
    slots: &[Slot],
    base: Option<usize>,
) -> Result<EmbeddingPlan> {
    let n = info.tokens.len();
    let perm = |s: usize, t: usize| -> Option<u32> {
        slots
            .get(s)
            .and_then(|slot| info.permutations.get(slot.model))
            .and_then(|p| p.get(t).copied().flatten())
    };
    let base_slot = base.and_then(|b| slots.iter().position(|s| s.model == b));
    let configured: HashMap<&str, &TokenConfig> =
        spec.tokens.iter().map(|(t, c)| (t.as_str(), c)).collect();

    // assign_embedding_sources.
    let mut assigned = Vec::with_capacity(n);
    for (t, token) in info.tokens.iter().enumerate() {
        if let Some(cfg) = configured.get(token.as_str()) {
            assigned.push(Assigned::Configured(cfg));
            continue;
        }
        let present: Vec<usize> = (0..slots.len()).filter(|&s| perm(s, t).is_some()).collect();
        assigned.push(match present.as_slice() {
            [only] => Assigned::Slot(*only),
            [] => Assigned::Zero,
            _ => match base_slot {
                Some(b) if perm(b, t).is_some() => Assigned::Slot(b),
                _ => Assigned::Average,
            },
        });
    }

    let mut defaults = Vec::new();
    let mut default_of: Vec<Option<usize>> = vec![None; n];
    for (t, token) in info.tokens.iter().enumerate() {
        let forced = matches!(assigned[t], Assigned::Configured(c) if c.force);
        if !forced && (0..slots.len()).all(|s| perm(s, t).is_some()) {
            continue;
        }
        let row = match &assigned[t] {
            Assigned::Average => DefaultRow::Average(
                (0..slots.len())
                    .filter_map(|s| perm(s, t).map(|r| (s, r)))
                    .collect(),
            ),
            Assigned::Zero => DefaultRow::Zero,
            Assigned::Slot(s) => match perm(*s, t) {
                Some(row) => DefaultRow::Copy { slot: *s, row },
                None => return Err(Error::internal(format!("donor lacks token {token:?}"))),
            },
            Assigned::Configured(cfg) => configured_default(info, slots, token, t, cfg)?,
        };
        default_of[t] = Some(defaults.len());
        defaults.push(row);
    }

    let rows = (0..slots.len())
        .map(|s| {
            (0..n)
                .map(|t| {
                    let forced = matches!(assigned[t], Assigned::Configured(c) if c.force);
                    match (perm(s, t), default_of[t]) {
                        (Some(r), _) if !forced => RowSource::Row(r),
                        (_, Some(k)) => RowSource::Default(k),
                        _ => RowSource::Missing,
                    }
                })
                .collect()
        })
        .collect();
    Ok(EmbeddingPlan {
        tokens: n,
        vocab_size: info.vocab_size,
        defaults,
        rows,
    })
}

/// compute_default_embedding for a token with a `tokens:` entry.
fn configured_default(
    info: &TokenizerInfo,
    slots: &[Slot],
    token: &str,
    t: usize,
    cfg: &TokenConfig,
) -> Result<DefaultRow> {
    let fail = |msg: String| {
        Err(Error::invalid(format!(
            "tokenizer.tokens: token {token:?}: {msg}"
        )))
    };
    let model = match &cfg.source {
        Some(TokenSource::Zero) => return Ok(DefaultRow::Zero),
        None => {
            return fail(
                "some models lack it (or it is forced) and its entry gives no `source`".into(),
            );
        }
        Some(TokenSource::Model(m)) | Some(TokenSource::ModelToken { model: m, .. }) => m,
    };
    let Some(m) = info.model_index(model) else {
        return fail(format!(
            "source model {model} is not one of the models in the merge"
        ));
    };
    let Some(slot) = slots.iter().position(|s| s.model == m) else {
        return fail(format!(
            "needs a vocabulary row from model {model}, but that model has no such tensor here"
        ));
    };
    let row = match &cfg.source {
        Some(TokenSource::ModelToken { token: src, .. }) => {
            let id = match src {
                TokenRef::Id(id) => *id,
                TokenRef::Text(text) => match info.original_vocabs[m].get(text) {
                    Some(&id) => i64::from(id),
                    None => return fail(format!("model {model} has no token {text:?}")),
                },
            };
            if id < 0 || id as u64 >= slots[slot].rows as u64 {
                return fail(format!(
                    "token id {id} is out of range for model {model} ({} rows)",
                    slots[slot].rows
                ));
            }
            id as u32
        }
        _ => match info.permutations[m].get(t).copied().flatten() {
            Some(r) => r,
            None => return fail(format!("source model {model} does not have this token")),
        },
    };
    Ok(DefaultRow::Copy { slot, row })
}
