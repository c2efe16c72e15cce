//! `diff --plot`: a heatmap of relative difference, layers down, modules across.
//!
//! Each cell is ‖a−b‖/‖b‖ of one module of one layer (its weight and bias pooled), on a log
//! scale with the viridis colour map (perceptually even, readable in grey and by most colour-
//! blind readers). Tensors outside the layers (embeddings, final norm, lm_head) get a panel of
//! their own beside the grid, on the same scale. Bitwise-identical cells are light grey and
//! tensors that could not be compared (only on one side, shape or dtype differ) are crossed
//! out, each with a legend entry. Row labels thin out (every 2nd, 5th, ... layer) so they never
//! overlap however deep the model.
//!
//! PNG text is drawn with an embedded subset of DejaVu Sans (`assets/fonts`, its licence
//! beside it), so no system font or fontconfig is needed; SVG text names `sans-serif` and is
//! drawn by the viewer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::DiffReport;
use crate::error::{Error, Result};
use crate::plan::order::compare_names;

/// DejaVu Sans, printable ASCII plus a few symbols (see `assets/fonts/README.md`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// What one cell shows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cell {
    /// No such tensor in this layer.
    Empty,
    /// Bitwise equal.
    Identical,
    /// Relative L2 difference (> 0, or `inf` when ‖b‖ = 0).
    Value(f64),
    /// Only on one side, or shape/dtype mismatch: not compared.
    Missing,
}

/// The plot's data: a layer × module grid and the tensors outside layers.
#[derive(Clone, Debug, Default)]
pub struct Heatmap {
    pub layers: Vec<u64>,
    /// Column labels (short module names: q, k, v, o, gate, up, down, in_norm, ...).
    pub columns: Vec<String>,
    /// `cells[row][column]`.
    pub cells: Vec<Vec<Cell>>,
    /// Tensors outside layers: label and cell, in module order.
    pub outside: Vec<(String, Cell)>,
}

/// Pooled sums of one cell.
#[derive(Default, Clone, Copy)]
struct Acc {
    sq_diff: f64,
    sq_b: f64,
    differs: bool,
    missing: bool,
    bytewise: bool,
}

impl Acc {
    fn cell(&self) -> Cell {
        if self.missing {
            Cell::Missing
        } else if !self.differs {
            Cell::Identical
        } else if self.sq_b > 0.0 && !self.bytewise {
            Cell::Value((self.sq_diff / self.sq_b).sqrt())
        } else {
            // No magnitude (differing non-float tensors, or ‖b‖ = 0): the top of the scale.
            Cell::Value(f64::INFINITY)
        }
    }
}

/// Where a tensor goes: (layer, module key) inside a layer, or its name outside.
fn place(name: &str) -> (Option<u64>, String) {
    let parts: Vec<&str> = name.split('.').collect();
    let Some(i) = parts.iter().position(|p| p.parse::<u64>().is_ok()) else {
        let trimmed = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(name);
        return (None, trimmed.to_string());
    };
    let layer = parts[i].parse::<u64>().ok();
    let mut rest: Vec<&str> = parts[i + 1..].to_vec();
    if rest.len() > 1 && matches!(rest.last(), Some(&"weight") | Some(&"bias")) {
        rest.pop();
    }
    (layer, rest.join("."))
}

/// A short column label for a module key (`self_attn.q_proj` → `q`).
pub fn short_label(key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    let named = match last {
        "input_layernorm" | "ln_1" => Some("in_norm"),
        "post_attention_layernorm" | "ln_2" => Some("post_norm"),
        "pre_feedforward_layernorm" => Some("pre_ff_norm"),
        "post_feedforward_layernorm" => Some("post_ff_norm"),
        _ => None,
    };
    match named {
        Some(n) => n.to_string(),
        None => last.strip_suffix("_proj").unwrap_or(last).to_string(),
    }
}

/// Short, distinct column labels: each module's short name, or, where two modules share one
/// (the experts of a mixture), as many trailing components of their keys as tell them apart
/// (`3.w1`, `4.w1`).
pub fn column_labels(keys: &[String]) -> Vec<String> {
    let mut labels: Vec<String> = keys.iter().map(|k| short_label(k)).collect();
    for _ in 0..8 {
        let dup: Vec<bool> = labels
            .iter()
            .map(|l| labels.iter().filter(|m| *m == l).count() > 1)
            .collect();
        if !dup.contains(&true) {
            break;
        }
        for (i, key) in keys.iter().enumerate() {
            if !dup[i] {
                continue;
            }
            // One more component of the key in front of what the label shows.
            let shown = labels[i].matches('.').count() + 2;
            let parts: Vec<&str> = key.split('.').collect();
            let from = parts.len().saturating_sub(shown);
            let tail = parts[from..].join(".");
            labels[i] = match tail.rsplit_once('.') {
                Some((head, last)) => format!("{head}.{}", short_label(last)),
                None => short_label(&tail),
            };
        }
    }
    labels
}

/// `label` cut from the left to `max` characters (the end names the module).
fn fit(label: &str, max: usize) -> String {
    let n = label.chars().count();
    if n <= max || max < 2 {
        return label.to_string();
    }
    let tail: String = label.chars().skip(n - (max - 1)).collect();
    format!("\u{2026}{tail}")
}

impl Heatmap {
    pub fn from_report(report: &DiffReport) -> Heatmap {
        let mut grid: BTreeMap<(u64, String), Acc> = BTreeMap::new();
        let mut outside: BTreeMap<String, Acc> = BTreeMap::new();
        let mut add = |name: &str, f: &dyn Fn(&mut Acc)| match place(name) {
            (Some(l), key) => f(grid.entry((l, key)).or_default()),
            (None, key) => f(outside.entry(key).or_default()),
        };
        for t in &report.tensors {
            add(&t.name, &|a: &mut Acc| {
                a.sq_diff += t.sq_diff;
                a.sq_b += t.sq_b;
                a.differs |= t.status != super::Status::Identical;
                a.bytewise |= t.rel_l2.is_none();
            });
        }
        let missing = report
            .only_in_a
            .iter()
            .chain(&report.only_in_b)
            .chain(report.mismatched.iter().map(|m| &m.name));
        for name in missing {
            add(name, &|a: &mut Acc| a.missing = true);
        }
        let mut layers: Vec<u64> = grid.keys().map(|(l, _)| *l).collect();
        layers.dedup();
        let mut keys: Vec<String> = grid.keys().map(|(_, k)| k.clone()).collect();
        keys.sort_by(|x, y| compare_names(x, y));
        keys.dedup();
        let columns = column_labels(&keys);
        let cells = layers
            .iter()
            .map(|&l| {
                keys.iter()
                    .map(|k| grid.get(&(l, k.clone())).map_or(Cell::Empty, Acc::cell))
                    .collect()
            })
            .collect();
        let mut outside: Vec<(String, Cell)> =
            outside.into_iter().map(|(k, a)| (k, a.cell())).collect();
        outside.sort_by(|x, y| compare_names(&x.0, &y.0));
        Heatmap {
            layers,
            columns,
            cells,
            outside,
        }
    }

    /// The log10 range the colour scale spans: the values shown, at most 8 decades (anything
    /// smaller takes the bottom colour), at least a third of one (so one value is not a
    /// division by zero).
    pub fn scale(&self) -> (f64, f64) {
        let values = self
            .cells
            .iter()
            .flatten()
            .chain(self.outside.iter().map(|(_, c)| c))
            .filter_map(|c| match c {
                Cell::Value(v) if v.is_finite() && *v > 0.0 => Some(v.log10()),
                _ => None,
            });
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if !lo.is_finite() {
            return (-6.0, 0.0);
        }
        let lo = lo.max(hi - 8.0);
        if hi - lo < 0.3 {
            let mid = (lo + hi) / 2.0;
            return (mid - 0.15, mid + 0.15);
        }
        (lo, hi)
    }
}

/// Tick values (log10, label) of the colour scale: every decade in range, with 2 and 5 of
/// each decade too when the range is short.
pub fn ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let decades = hi - lo;
    let mults: &[u32] = if decades <= 3.5 { &[1, 2, 5] } else { &[1] };
    let every = if decades > 8.0 { 2 } else { 1 };
    let mut out = Vec::new();
    for d in (lo.floor() as i32..=hi.ceil() as i32).step_by(every) {
        for &m in mults {
            let v = (m as f64).log10() + d as f64;
            if v >= lo - 1e-9 && v <= hi + 1e-9 {
                let label = match d {
                    0 => format!("{m}"),
                    -1 => format!("0.{m}"),
                    -2 => format!("0.0{m}"),
                    _ => format!("{m}e{d}"),
                };
                out.push((v, label));
            }
        }
    }
    out
}

/// Viridis at t ∈ [0, 1] (matplotlib's anchors, linearly interpolated).
pub fn viridis(t: f64) -> RGBColor {
    const ANCHORS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (72, 40, 120),
        (62, 74, 137),
        (49, 104, 142),
        (38, 130, 142),
        (31, 158, 137),
        (53, 183, 121),
        (109, 205, 89),
        (253, 231, 37),
    ];
    let t = if t.is_nan() { 1.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (ANCHORS.len() - 1) as f64;
    let i = (x.floor() as usize).min(ANCHORS.len() - 2);
    let f = x - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (ANCHORS[i], ANCHORS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Every how many rows to label so labels `font` px high never overlap rows `cell_h` apart.
pub fn label_step(cell_h: i32, font: i32) -> usize {
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
        .into_iter()
        .find(|&s| s as i32 * cell_h >= font + 2)
        .unwrap_or(1000)
}

const IDENTICAL: RGBColor = RGBColor(222, 222, 222);
const GRID_LINE: RGBColor = RGBColor(255, 255, 255);
const CROSS: RGBColor = RGBColor(150, 150, 150);
const TEXT: RGBColor = RGBColor(20, 20, 20);

/// Cut a long path from the left so the title stays inside the picture.
fn shorten(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        s.to_string()
    } else {
        let tail: String = s.chars().skip(n - max + 3).collect();
        format!("...{tail}")
    }
}

/// Pixel geometry of the picture, decided from the data.
struct Geometry {
    width: u32,
    height: u32,
    left: i32,
    top: i32,
    cell_w: i32,
    cell_h: i32,
    side_x: i32,
    side_label_w: i32,
    bar_x: i32,
    bar_h: i32,
}

const FONT_PX: i32 = 14;
const TITLE_PX: i32 = 18;
const SIDE_ROW: i32 = 26;

impl Geometry {
    fn of(h: &Heatmap) -> Geometry {
        let rows = h.layers.len().max(1) as i32;
        // Tall enough to read a row, short enough that 80 layers fit on a screen.
        let cell_h = (900 / rows).clamp(10, 28);
        let char_w = FONT_PX * 6 / 10;
        let widest = h.columns.iter().map(|c| c.len()).max().unwrap_or(1) as i32;
        let cell_w = (widest * char_w + 10).clamp(44, 110);
        let left = 76;
        let top = 96;
        let grid_w = cell_w * h.columns.len() as i32;
        let side_x = left + grid_w + 48;
        let side_label_w = h
            .outside
            .iter()
            .map(|(n, _)| n.len().min(32) as i32 * char_w)
            .max()
            .unwrap_or(0)
            .max(14 * char_w);
        let bar_x = side_x + 44 + 8 + side_label_w + 40;
        let grid_h = cell_h * rows;
        let bar_h = grid_h.clamp(240, 420);
        let legend_bottom = top + bar_h + 110;
        let side_bottom = top + SIDE_ROW * h.outside.len() as i32;
        let height = (top + grid_h).max(legend_bottom).max(side_bottom) + 40;
        let title_w = 20 + 70 * TITLE_PX * 6 / 10;
        let width = (bar_x + 24 + 150).max(title_w) + 20;
        Geometry {
            width: width as u32,
            height: height as u32,
            left,
            top,
            cell_w,
            cell_h,
            side_x,
            side_label_w,
            bar_x,
            bar_h,
        }
    }
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(Error::internal("the embedded font does not load"))
    }
}

/// Which backend a plot file name asks for.
enum Kind {
    Png,
    Svg,
}

fn kind(path: &Path) -> Result<Kind> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(Kind::Png),
        Some("svg") => Ok(Kind::Svg),
        _ => Err(Error::usage(format!(
            "--plot {}: give a file name ending in .png or .svg",
            path.display()
        ))),
    }
}

/// Check a plot file name before any data is read (a usage error otherwise).
pub fn check_path(path: &Path) -> Result<()> {
    kind(path).map(|_| ())
}

/// Write the heatmap of `report` to `path`: PNG or SVG, by its extension.
pub fn write_plot(report: &DiffReport, path: &Path) -> Result<()> {
    let heat = Heatmap::from_report(report);
    let g = Geometry::of(&heat);
    let fail = |e: String| Error::invalid(format!("cannot draw the plot: {e}")).in_file(path);
    match kind(path)? {
        Kind::Png => {
            register_font()?;
            let root = BitMapBackend::new(path, (g.width, g.height)).into_drawing_area();
            draw(&root, report, &heat, &g, 1.0).map_err(|e| fail(e.to_string()))?;
            root.present().map_err(|e| fail(e.to_string()))
        }
        Kind::Svg => {
            // plotters' SVG backend writes font sizes divided by 1.24 (its em-to-pixel
            // ratio), the bitmap one draws glyphs at the size given: scale SVG text to match.
            let root = SVGBackend::new(path, (g.width, g.height)).into_drawing_area();
            draw(&root, report, &heat, &g, 1.24).map_err(|e| fail(e.to_string()))?;
            root.present().map_err(|e| fail(e.to_string()))
        }
    }
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn text_style(px: f64, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle::from((FAMILY, px).into_font())
        .color(&TEXT)
        .pos(Pos::new(h, v))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &DiffReport,
    heat: &Heatmap,
    g: &Geometry,
    text_scale: f64,
) -> DrawResult<DB> {
    let style = |px: i32, h: HPos, v: VPos| text_style(px as f64 * text_scale, h, v);
    root.fill(&WHITE)?;
    let (lo, hi) = heat.scale();
    let colour = |c: Cell| -> Option<RGBColor> {
        match c {
            Cell::Empty | Cell::Missing => None,
            Cell::Identical => Some(IDENTICAL),
            Cell::Value(v) => {
                let t = if v > 0.0 {
                    (v.log10() - lo) / (hi - lo)
                } else {
                    0.0
                };
                Some(viridis(t))
            }
        }
    };
    // One cell: its colour, or a cross for a tensor that was not compared.
    let cell = |x: i32, y: i32, w: i32, h: i32, c: Cell| -> DrawResult<DB> {
        if let Some(col) = colour(c) {
            root.draw(&Rectangle::new([(x, y), (x + w, y + h)], col.filled()))?;
        }
        if c == Cell::Missing {
            let s = CROSS.stroke_width(1);
            root.draw(&Rectangle::new([(x, y), (x + w, y + h)], s))?;
            root.draw(&PathElement::new(vec![(x, y), (x + w, y + h)], s))?;
            root.draw(&PathElement::new(vec![(x, y + h), (x + w, y)], s))?;
        }
        Ok(())
    };

    let sm = &report.summary;
    root.draw(&Text::new(
        "Relative difference ||a-b|| / ||b|| per tensor".to_string(),
        (20, 14),
        style(TITLE_PX, HPos::Left, VPos::Top),
    ))?;
    let ulp = sm.max_ulp.map_or(String::new(), |u| {
        if u == u64::MAX {
            ", NaN vs number".to_string()
        } else {
            format!(", max {u} ulp")
        }
    });
    root.draw(&Text::new(
        format!(
            "a = {}   b = {}",
            shorten(&report.a, 48),
            shorten(&report.b, 48)
        ),
        (20, 40),
        style(FONT_PX - 1, HPos::Left, VPos::Top),
    ))?;
    root.draw(&Text::new(
        format!(
            "{}: {} of {} tensors differ{ulp}; {} only in a, {} only in b, {} mismatched",
            sm.verdict,
            sm.differing + sm.within,
            sm.compared,
            sm.only_in_a,
            sm.only_in_b,
            sm.mismatched
        ),
        (20, 60),
        style(FONT_PX - 1, HPos::Left, VPos::Top),
    ))?;

    // The grid: a row per layer, a column per module.
    let (x0, y0) = (g.left, g.top);
    let head_y = y0 - 8;
    root.draw(&Text::new(
        "layer".to_string(),
        (x0 - 8, head_y),
        style(FONT_PX, HPos::Right, VPos::Bottom),
    ))?;
    for (j, label) in heat.columns.iter().enumerate() {
        let cx = x0 + j as i32 * g.cell_w + g.cell_w / 2;
        root.draw(&Text::new(
            fit(label, ((g.cell_w - 4) / (FONT_PX * 6 / 10)) as usize),
            (cx, head_y),
            style(FONT_PX, HPos::Center, VPos::Bottom),
        ))?;
    }
    let step = label_step(g.cell_h, FONT_PX);
    for (i, (layer, row)) in heat.layers.iter().zip(&heat.cells).enumerate() {
        let y = y0 + i as i32 * g.cell_h;
        for (j, &c) in row.iter().enumerate() {
            let x = x0 + j as i32 * g.cell_w;
            cell(x, y, g.cell_w, g.cell_h, c)?;
        }
        if i % step == 0 {
            root.draw(&Text::new(
                layer.to_string(),
                (x0 - 8, y + g.cell_h / 2),
                style(FONT_PX, HPos::Right, VPos::Center),
            ))?;
            // A tick where rows are thinned, so a label points at its row.
            if step > 1 {
                root.draw(&PathElement::new(
                    vec![(x0 - 5, y + g.cell_h / 2), (x0 - 1, y + g.cell_h / 2)],
                    TEXT.stroke_width(1),
                ))?;
            }
        }
    }
    // White lines between cells, so neighbours with close colours stay apart.
    let grid_w = g.cell_w * heat.columns.len() as i32;
    let grid_h = g.cell_h * heat.layers.len() as i32;
    for j in 1..heat.columns.len() as i32 {
        let x = x0 + j * g.cell_w;
        root.draw(&PathElement::new(
            vec![(x, y0), (x, y0 + grid_h)],
            GRID_LINE.stroke_width(2),
        ))?;
    }
    if g.cell_h >= 14 {
        for i in 1..heat.layers.len() as i32 {
            let y = y0 + i * g.cell_h;
            root.draw(&PathElement::new(
                vec![(x0, y), (x0 + grid_w, y)],
                GRID_LINE.stroke_width(1),
            ))?;
        }
    }
    if heat.layers.is_empty() {
        root.draw(&Text::new(
            "no per-layer tensors".to_string(),
            (x0, y0 + 10),
            style(FONT_PX, HPos::Left, VPos::Top),
        ))?;
    }

    // Tensors outside the layers, on the same scale.
    root.draw(&Text::new(
        "outside layers".to_string(),
        (g.side_x, head_y),
        style(FONT_PX, HPos::Left, VPos::Bottom),
    ))?;
    for (i, (name, c)) in heat.outside.iter().enumerate() {
        let y = y0 + i as i32 * SIDE_ROW;
        cell(g.side_x, y, 44, SIDE_ROW - 4, *c)?;
        root.draw(&Text::new(
            shorten(name, 32),
            (g.side_x + 52, y + (SIDE_ROW - 4) / 2),
            style(FONT_PX, HPos::Left, VPos::Center),
        ))?;
    }
    let _ = g.side_label_w;

    // The colour scale: decades of relative difference, largest at the top.
    let (bx, bw, bh) = (g.bar_x, 22, g.bar_h);
    root.draw(&Text::new(
        "rel. diff".to_string(),
        (bx, head_y),
        style(FONT_PX, HPos::Left, VPos::Bottom),
    ))?;
    for k in 0..bh {
        let t = 1.0 - k as f64 / (bh - 1).max(1) as f64;
        root.draw(&Rectangle::new(
            [(bx, y0 + k), (bx + bw, y0 + k + 1)],
            viridis(t).filled(),
        ))?;
    }
    root.draw(&Rectangle::new(
        [(bx, y0), (bx + bw, y0 + bh)],
        TEXT.stroke_width(1),
    ))?;
    for (v, label) in ticks(lo, hi) {
        let y = y0 + ((hi - v) / (hi - lo) * (bh - 1) as f64).round() as i32;
        root.draw(&PathElement::new(
            vec![(bx + bw, y), (bx + bw + 5, y)],
            TEXT.stroke_width(1),
        ))?;
        root.draw(&Text::new(
            label,
            (bx + bw + 8, y),
            style(FONT_PX, HPos::Left, VPos::Center),
        ))?;
    }
    // Swatches for what is not on the scale.
    let ly = y0 + bh + 24;
    cell(bx, ly, bw, 16, Cell::Identical)?;
    root.draw(&Text::new(
        "identical".to_string(),
        (bx + bw + 8, ly + 8),
        style(FONT_PX, HPos::Left, VPos::Center),
    ))?;
    cell(bx, ly + 26, bw, 16, Cell::Missing)?;
    root.draw(&Text::new(
        "not compared".to_string(),
        (bx + bw + 8, ly + 34),
        style(FONT_PX, HPos::Left, VPos::Center),
    ))?;
    root.draw(&Text::new(
        "(one side only,".to_string(),
        (bx + bw + 8, ly + 52),
        style(FONT_PX - 2, HPos::Left, VPos::Center),
    ))?;
    root.draw(&Text::new(
        "shape/dtype differ)".to_string(),
        (bx + bw + 8, ly + 68),
        style(FONT_PX - 2, HPos::Left, VPos::Center),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_land_in_layer_and_module() {
        assert_eq!(
            place("model.layers.12.self_attn.q_proj.weight"),
            (Some(12), "self_attn.q_proj".to_string())
        );
        assert_eq!(
            place("model.embed_tokens.weight"),
            (None, "model.embed_tokens".to_string())
        );
        assert_eq!(short_label("self_attn.q_proj"), "q");
        assert_eq!(short_label("mlp.gate_proj"), "gate");
        assert_eq!(short_label("input_layernorm"), "in_norm");
        assert_eq!(short_label("post_attention_layernorm"), "post_norm");
    }

    #[test]
    fn expert_columns_get_distinct_short_labels() {
        let keys: Vec<String> = [
            "self_attn.q_proj",
            "block_sparse_moe.gate",
            "block_sparse_moe.experts.0.w1",
            "block_sparse_moe.experts.1.w1",
            "block_sparse_moe.experts.0.w2",
            "input_layernorm",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            column_labels(&keys),
            ["q", "gate", "0.w1", "1.w1", "w2", "in_norm"]
        );
        assert_eq!(fit("experts.10.w1", 8), "\u{2026}s.10.w1");
        assert_eq!(fit("q", 8), "q");
    }

    #[test]
    fn labels_thin_out_at_depth() {
        assert_eq!(label_step(28, 14), 1);
        assert_eq!(label_step(11, 14), 2);
        assert_eq!(label_step(3, 14), 10);
    }

    #[test]
    fn colour_map_ends_and_scale() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        let h = Heatmap {
            layers: vec![0],
            columns: vec!["q".into(), "k".into()],
            cells: vec![vec![Cell::Value(3e-4), Cell::Value(0.02)]],
            outside: vec![("lm_head".into(), Cell::Identical)],
        };
        let (lo, hi) = h.scale();
        assert!((lo - 3e-4f64.log10()).abs() < 1e-12 && (hi - 0.02f64.log10()).abs() < 1e-12);
        assert_eq!(Heatmap::default().scale(), (-6.0, 0.0));
        let t: Vec<String> = ticks(lo, hi).into_iter().map(|(_, l)| l).collect();
        assert_eq!(t, ["5e-4", "1e-3", "2e-3", "5e-3", "0.01", "0.02"]);
        let t: Vec<String> = ticks(-6.0, 0.0).into_iter().map(|(_, l)| l).collect();
        assert_eq!(t, ["1e-6", "1e-5", "1e-4", "1e-3", "0.01", "0.1", "1"]);
    }
}
