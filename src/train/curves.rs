//! training_curves.png: a run's metrics.jsonl drawn as a grid of panels,
//! one per metric the run logged (loss with eval loss, learning rate, grad
//! norm, tokens/s, and the reward metrics of preference runs), step on the
//! x axis. `ferrotune plot` draws it on demand; `train` redraws it at each
//! checkpoint and at the end.
//!
//! A new panel is one more entry in `PANELS`; a panel whose keys no record
//! carries is left out. The font is compiled in (no system fonts needed).

use super::progress::METRICS_FILE;
use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const CURVES_FILE: &str = "training_curves.png";

/// One panel's size in pixels; the image is `COLUMNS` panels wide.
const PANEL_W: u32 = 640;
const PANEL_H: u32 = 360;
const COLUMNS: u32 = 2;
/// The header line above the panels.
const HEADER_H: u32 = 40;

/// The family name plotters looks fonts up by; the embedded font is
/// registered under it so every default text style finds it too.
const FONT: &str = "sans-serif";

/// A curve of one panel: a metrics.jsonl key and how it is shown.
struct Curve {
    key: &'static str,
    label: &'static str,
    color: RGBColor,
    /// Eval records are few: drawn as dots joined by a line.
    dots: bool,
}

struct PanelSpec {
    title: &'static str,
    y_label: &'static str,
    curves: &'static [Curve],
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(230, 110, 20);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(128, 80, 170);

const fn line(key: &'static str, label: &'static str, color: RGBColor) -> Curve {
    Curve { key, label, color, dots: false }
}

const fn dots(key: &'static str, label: &'static str, color: RGBColor) -> Curve {
    Curve { key, label, color, dots: true }
}

/// The panels, in the order they are laid out (row by row).
const PANELS: &[PanelSpec] = &[
    PanelSpec { title: "loss", y_label: "loss", curves: &[line("loss", "train", BLUE), dots("eval_loss", "eval", ORANGE)] },
    PanelSpec { title: "learning rate", y_label: "lr", curves: &[line("lr", "lr", GREEN)] },
    PanelSpec { title: "gradient norm (before clipping)", y_label: "grad norm", curves: &[line("grad_norm", "grad norm", RED)] },
    PanelSpec { title: "throughput", y_label: "tokens/s", curves: &[line("tokens_per_s", "tokens/s", PURPLE)] },
    PanelSpec { title: "reward margin (chosen - rejected)", y_label: "margin", curves: &[line("rewards/margins", "train", BLUE), dots("eval_rewards/margins", "eval", ORANGE)] },
    PanelSpec { title: "reward accuracy", y_label: "accuracy", curves: &[line("rewards/accuracies", "train", BLUE), dots("eval_rewards/accuracies", "eval", ORANGE)] },
    PanelSpec { title: "rewards", y_label: "reward", curves: &[line("rewards/chosen", "chosen", GREEN), line("rewards/rejected", "rejected", RED)] },
    PanelSpec { title: "log-probs", y_label: "log-prob", curves: &[line("logps/chosen", "chosen", GREEN), line("logps/rejected", "rejected", RED)] },
    PanelSpec { title: "KL to the reference (KTO)", y_label: "kl", curves: &[line("kl", "kl", PURPLE), dots("eval_kl", "eval", ORANGE)] },
];

/// metrics.jsonl's records, in file order.
pub struct Metrics {
    pub path: PathBuf,
    records: Vec<Map<String, Value>>,
}

impl Metrics {
    /// Read output_dir's metrics.jsonl. Every line must be a JSON object
    /// with a "step" number; blank lines are skipped.
    pub fn read(output_dir: &Path) -> Result<Metrics> {
        let path = output_dir.join(METRICS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{} does not exist: is {} the output_dir of a training run?", path.display(), output_dir.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Metrics::parse(&path, &text)
    }

    /// Parse metrics.jsonl's text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Metrics> {
        let mut records = Vec::new();
        for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = || format!("{} line {}", path.display(), i + 1);
            let v: Value = serde_json::from_str(l).map_err(|e| anyhow!("{}: not valid JSON ({e})", at()))?;
            let Value::Object(map) = v else { bail!("{}: expected a JSON object like {{\"step\": 1, \"loss\": 2.5}}", at()) };
            if map.get("step").is_none_or(|s| s.as_f64().is_none()) {
                bail!("{}: the record has no \"step\" number", at());
            }
            records.push(map);
        }
        if records.is_empty() {
            bail!("{} has no records: the run logged nothing yet (records are written every logging_steps)", path.display());
        }
        Ok(Metrics { path: path.to_path_buf(), records })
    }

    /// (step, value) of every record with a finite number under `key`
    /// (a window with no target tokens logs its loss as null).
    fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.records
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
            .filter(|(s, v)| s.is_finite() && v.is_finite())
            .collect()
    }
}

/// A panel with its data, ready to draw.
struct Panel<'a> {
    spec: &'a PanelSpec,
    curves: Vec<(&'a Curve, Vec<(f64, f64)>)>,
}

fn panels(m: &Metrics) -> Vec<Panel<'static>> {
    PANELS
        .iter()
        .map(|spec| Panel {
            spec,
            curves: spec.curves.iter().map(|c| (c, m.series(c.key))).filter(|(_, s)| !s.is_empty()).collect(),
        })
        .filter(|p| !p.curves.is_empty())
        .collect()
}

/// What was drawn: the image's size and the titles of its panels, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    pub width: u32,
    pub height: u32,
    pub panels: Vec<&'static str>,
}

/// The image's layout: (columns, rows, width, height) for `n` panels.
pub fn layout(n: usize) -> (u32, u32, u32, u32) {
    let cols = COLUMNS.min(n.max(1) as u32);
    let rows = (n.max(1) as u32).div_ceil(cols);
    (cols, rows, cols * PANEL_W, HEADER_H + rows * PANEL_H)
}

/// Draw the metrics as a PNG (its bytes) with a header naming `title`.
pub fn render(m: &Metrics, title: &str) -> Result<(Vec<u8>, Drawn)> {
    register_font()?;
    let panels = panels(m);
    if panels.is_empty() {
        bail!(
            "{} has no metric to plot: no record carries loss, eval_loss, lr, grad_norm, tokens_per_s or a preference metric",
            m.path.display()
        );
    }
    let (cols, rows, width, height) = layout(panels.len());
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        let (header, body) = root.split_vertically(HEADER_H);
        let last = m.records.iter().filter_map(|r| r.get("step")?.as_f64()).fold(0.0, f64::max);
        let head = format!("{title}: training curves to step {last}");
        header
            .draw_text(&head, &(FONT, 22).into_font().color(&BLACK), (12, 10))
            .map_err(|e| anyhow!("drawing the header: {e}"))?;
        let areas = body.split_evenly((rows as usize, cols as usize));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, panel).map_err(|e| anyhow!("drawing the {} panel: {e}", panel.spec.title))?;
        }
        root.present().map_err(|e| anyhow!("drawing: {e}"))?;
    }
    let png = encode_png(&rgb, width, height)?;
    Ok((png, Drawn { width, height, panels: panels.iter().map(|p| p.spec.title).collect() }))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, p: &Panel) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let all = p.curves.iter().flat_map(|(_, s)| s.iter());
    let (xs, ys) = (range(all.clone().map(|&(x, _)| x)), range(all.map(|&(_, y)| y)));
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .margin_right(20)
        .caption(p.spec.title, (FONT, 18))
        .x_label_area_size(34)
        .y_label_area_size(68)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(242, 242, 242))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_desc("step")
        .y_desc(p.spec.y_label)
        .axis_desc_style((FONT, 14))
        .label_style((FONT, 12))
        .x_label_formatter(&|v| tick(*v, xs.1 - xs.0))
        .y_label_formatter(&|v| tick(*v, ys.1 - ys.0))
        // Steps are whole numbers: no more labels than steps in a short run.
        .x_labels(((xs.1 - xs.0).ceil() as usize + 1).clamp(2, 8))
        .y_labels(6)
        .draw()?;
    let columns = chart.plotting_area().dim_in_pixel().0 as usize;
    for (curve, all) in &p.curves {
        let pts = thin(all, xs, columns);
        // Noisy long runs read better thin; a few points, thick.
        let style = ShapeStyle::from(&curve.color).stroke_width(if pts.len() > columns / 3 { 1 } else { 2 });
        // Segment by segment: plotters mitres the corners of a thick
        // polyline, and sharp turns then shoot spikes across the image.
        let series = chart.draw_series(pts.windows(2).map(|w| PathElement::new(vec![w[0], w[1]], style)))?;
        if p.curves.len() > 1 {
            let c = curve.color;
            series.label(curve.label).legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        // A lone point draws no line: always mark it. Dots that would
        // merge into a band are left out.
        if (curve.dots && pts.len() <= MAX_DOTS) || pts.len() == 1 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, curve.color.filled())))?;
        }
    }
    if p.curves.len() > 1 {
        chart
            .configure_series_labels()
            .position(legend_corner(&p.curves, xs, ys))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font((FONT, 13))
            .draw()?;
    }
    Ok(())
}

/// At most this many eval dots on a curve.
const MAX_DOTS: usize = 120;

/// At most two points per pixel column (the lowest and the highest, in
/// step order): a long run's curve keeps its envelope at a fraction of the
/// drawing cost.
fn thin(pts: &[(f64, f64)], (x0, x1): (f64, f64), columns: usize) -> Vec<(f64, f64)> {
    if pts.len() <= 2 * columns.max(1) {
        return pts.to_vec();
    }
    let col = |x: f64| ((x - x0) / (x1 - x0) * columns as f64) as i64;
    let mut out = Vec::with_capacity(2 * columns);
    let mut i = 0;
    while i < pts.len() {
        let c = col(pts[i].0);
        let (mut lo, mut hi, mut j) = (i, i, i);
        while j < pts.len() && col(pts[j].0) == c {
            if pts[j].1 < pts[lo].1 {
                lo = j;
            }
            if pts[j].1 > pts[hi].1 {
                hi = j;
            }
            j += 1;
        }
        out.push(pts[lo.min(hi)]);
        if lo != hi {
            out.push(pts[lo.max(hi)]);
        }
        i = j;
    }
    out
}

/// The corner whose quarter of the plot holds the fewest points, so the
/// legend hides as little of the curves as it can (upper right on a tie).
fn legend_corner(curves: &[(&Curve, Vec<(f64, f64)>)], xs: (f64, f64), ys: (f64, f64)) -> SeriesLabelPosition {
    let (xm, ym) = ((xs.0 + xs.1) / 2.0, (ys.0 + ys.1) / 2.0);
    let mut count = [0usize; 4];
    for &(x, y) in curves.iter().flat_map(|(_, s)| s) {
        count[usize::from(x < xm) * 2 + usize::from(y < ym)] += 1;
    }
    let corners = [
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerLeft,
    ];
    let best = (0..4).min_by_key(|&i| count[i]).unwrap_or(0);
    corners.into_iter().nth(best).unwrap_or(SeriesLabelPosition::UpperRight)
}

/// The axis range of `values`, padded so no curve or dot sits on the
/// frame; a single value gets a range around it.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let p = (hi - lo) * 0.03;
    (lo - p, hi + p)
}

/// A tick label with the decimals the axis's spacing needs, so that close
/// values (a DPO loss moving in its fourth decimal) stay apart: plain for
/// ordinary magnitudes, scientific for learning rates and the like. A value
/// within a thousandth of a spacing of zero is float noise, shown as 0.
fn tick(v: f64, span: f64) -> String {
    let spacing = (span / 6.0).abs().max(f64::MIN_POSITIVE);
    let a = v.abs();
    if a < spacing * 1e-3 {
        return "0".into();
    }
    if !(1e-2..1e5).contains(&a) {
        let digits = ((a / spacing).log10().ceil().max(1.0) as usize).min(6);
        return format!("{v:.*e}", digits);
    }
    let decimals = (-spacing.log10()).ceil().clamp(0.0, 6.0) as usize;
    if decimals == 0 {
        return format!("{v:.0}");
    }
    let s = format!("{v:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::HACK_REGULAR).is_ok()
    });
    if ok { Ok(()) } else { bail!("the embedded plot font could not be loaded") }
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    // Mostly flat colour: the fast setting is nearly as small and keeps a
    // checkpoint's redraw cheap.
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header().context("encoding the PNG")?;
    w.write_image_data(rgb).context("encoding the PNG")?;
    w.finish().context("encoding the PNG")?;
    Ok(out)
}

/// Draw output_dir's metrics.jsonl into `out` (written atomically).
pub fn plot(output_dir: &Path, out: &Path) -> Result<Drawn> {
    draw(&Metrics::read(output_dir)?, output_dir, out)
}

fn draw(m: &Metrics, output_dir: &Path, out: &Path) -> Result<Drawn> {
    let (png, drawn) = render(m, &output_dir.display().to_string())?;
    crate::util::atomic_write(out, &png)?;
    Ok(drawn)
}

/// Redraw output_dir/training_curves.png during or after training. A
/// failure must not stop a run: it comes back as one warning line.
pub fn refresh(output_dir: &Path) -> Option<String> {
    // A checkpoint before the first logged step (logging_steps beyond
    // save_steps) has nothing to draw yet, which is no cause for a warning.
    let path = output_dir.join(METRICS_FILE);
    let logged = std::fs::read_to_string(&path).unwrap_or_default();
    if logged.trim().is_empty() {
        return None;
    }
    let out = output_dir.join(CURVES_FILE);
    Metrics::parse(&path, &logged)
        .and_then(|m| draw(&m, output_dir, &out))
        .err()
        .map(|e| format!("warning: {} not drawn: {e:#}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(text: &str) -> Result<Metrics> {
        Metrics::parse(Path::new("out/metrics.jsonl"), text)
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let e = metrics("{\"step\":1,\"loss\":2}\n\n{\"step\":2,\"loss\":\n").err().unwrap().to_string();
        assert!(e.starts_with("out/metrics.jsonl line 3: not valid JSON"), "{e}");
        let e = metrics("{\"loss\":2}\n").err().unwrap().to_string();
        assert_eq!(e, "out/metrics.jsonl line 1: the record has no \"step\" number");
        let e = metrics("[1,2]\n").err().unwrap().to_string();
        assert!(e.starts_with("out/metrics.jsonl line 1: expected a JSON object"), "{e}");
        let e = metrics("\n \n").err().unwrap().to_string();
        assert!(e.starts_with("out/metrics.jsonl has no records"), "{e}");
    }

    #[test]
    fn panels_follow_the_keys_present() {
        let sft = metrics(concat!(
            "{\"step\":1,\"loss\":3.0,\"lr\":0.001,\"grad_norm\":1.5,\"tokens_per_s\":900}\n",
            "{\"step\":2,\"loss\":null,\"lr\":0.001,\"grad_norm\":0.0,\"tokens_per_s\":950}\n",
            "{\"step\":2,\"eval_loss\":2.5}\n",
        ))
        .unwrap();
        let titles: Vec<&str> = panels(&sft).iter().map(|p| p.spec.title).collect();
        assert_eq!(titles, ["loss", "learning rate", "gradient norm (before clipping)", "throughput"]);
        // The null loss is skipped; the eval loss joins the loss panel.
        let loss = &panels(&sft)[0];
        assert_eq!(loss.curves[0].1, [(1.0, 3.0)]);
        assert_eq!(loss.curves[1].1, [(2.0, 2.5)]);
        let dpo = metrics("{\"step\":1,\"loss\":0.69,\"rewards/margins\":0.1,\"rewards/accuracies\":0.5}\n").unwrap();
        let titles: Vec<&str> = panels(&dpo).iter().map(|p| p.spec.title).collect();
        assert_eq!(titles, ["loss", "reward margin (chosen - rejected)", "reward accuracy"]);
        let kto = metrics("{\"step\":1,\"loss\":0.5,\"kl\":0.02,\"rewards/chosen\":0.1}\n").unwrap();
        let titles: Vec<&str> = panels(&kto).iter().map(|p| p.spec.title).collect();
        assert_eq!(titles, ["loss", "rewards", "KL to the reference (KTO)"]);
    }

    #[test]
    fn ranges_and_ticks() {
        assert_eq!(range([2.0].into_iter()), (1.8, 2.2));
        assert_eq!(range([0.0, 0.0].into_iter()), (-1.0, 1.0));
        let (lo, hi) = range([1.0, 11.0, 5.0].into_iter());
        assert!((lo - 0.7).abs() < 1e-12 && (hi - 11.3).abs() < 1e-12, "{lo} {hi}");
        assert_eq!(tick(0.005, 0.006), "5.0e-3");
        assert_eq!(tick(2.5, 3.0), "2.5");
        assert_eq!(tick(40.0, 100.0), "40");
        assert_eq!(tick(12345.6, 2000.0), "12346");
        assert_eq!(tick(0.0, 1.0), "0");
        // A loss moving in its fourth decimal keeps its ticks apart.
        assert_eq!((tick(0.69285, 0.0003), tick(0.6929, 0.0003)), ("0.69285".into(), "0.6929".into()));
        // Float noise next to zero is zero.
        assert_eq!(tick(-1.1e-19, 5e-4), "0");
        assert_eq!(tick(2e-7, 1e-6), "2.0e-7");
    }

    #[test]
    fn thinning_keeps_the_envelope() {
        let pts: Vec<(f64, f64)> = (1..=10_000).map(|s| (s as f64, ((s * 7919) % 1000) as f64)).collect();
        let t = thin(&pts, (1.0, 10_000.0), 100);
        assert!(t.len() <= 2 * 101, "{}", t.len());
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "in step order");
        let (lo, hi) = t.iter().fold((f64::MAX, f64::MIN), |(l, h), p| (l.min(p.1), h.max(p.1)));
        assert_eq!((lo, hi), (0.0, 999.0));
        let few = &pts[..150];
        assert_eq!(thin(few, (1.0, 150.0), 100), few, "short curves are drawn whole");
    }

    #[test]
    fn layout_is_two_panels_wide() {
        assert_eq!(layout(1), (1, 1, PANEL_W, HEADER_H + PANEL_H));
        assert_eq!(layout(4), (2, 2, 2 * PANEL_W, HEADER_H + 2 * PANEL_H));
        assert_eq!(layout(5), (2, 3, 2 * PANEL_W, HEADER_H + 3 * PANEL_H));
    }
}
