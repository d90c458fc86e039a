//! `cargo xtask plot [reports/<study>]`: renders a study's charts with plotters, as PNG and SVG,
//! into `reports/<study>/charts/`. `compare` calls [`render`] when it finishes, and `report.md`
//! embeds the charts.
//!
//! - `accuracy`: strict and lenient accuracy per method and reward source, the mean over seeds
//!   with 95% CI whiskers (see [`eval::stats::accuracy_interval`]).
//! - `stability`: box plots over steps and seeds of `update_norm`, `kl` and `reward_std` per
//!   trained method, and the across-seed standard deviation of final lenient accuracy.
//! - `convergence`: training reward and held-out accuracy (strict and lenient) against step, mean
//!   and a band of one standard deviation over seeds, with each method's median
//!   steps-to-convergence marked.
//! - `reward_model` (when a cell logs a learned reward beside a rule check): the learned reward's
//!   ranking AUC against the check on each step's completions, and the check's mean, against
//!   step: a reward model that is being exploited keeps its score while its AUC falls to 0.5.
//!
//! Only results are drawn: cells that failed or diverged (see `CellStatus`) are left out of
//! every chart (their accuracies are absent and their metrics are not read); `report.md` lists
//! them.
//!
//! Fonts come from the `dejavu` crate (DejaVu Sans, embedded), so charts render the same on any
//! machine without system fonts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use eval::stats::mean_std;
use plotters::coord::Shift;
use plotters::data::Quartiles;
use plotters::prelude::*;

use crate::study::report::CellSummary;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The study's report directory; the newest under `reports/` when none is named.
    report: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = match args.report {
        Some(dir) => dir,
        None => newest_study(Path::new("reports"))?,
    };
    for chart in render(&dir)? {
        println!("{}", chart.display());
    }
    Ok(())
}

/// The most recently written study under `reports` (a directory with a `summary.json`).
fn newest_study(reports: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(reports)
        .with_context(|| format!("cannot read {}: run `cargo xtask compare` first", reports.display()))?;
    let mut studies: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("summary.json"))
        .filter_map(|summary| Some((summary.metadata().ok()?.modified().ok()?, summary.parent()?.to_path_buf())))
        .collect();
    studies.sort();
    studies.pop().map(|(_, dir)| dir).with_context(|| {
        format!("no study under {} has a summary.json: run `cargo xtask compare` first", reports.display())
    })
}

/// One row of a cell's `metrics.csv`.
#[derive(Debug, Clone)]
struct MetricRow {
    group: String,
    step: u64,
    values: BTreeMap<String, f64>,
}

/// "method" or "method (reward source)": how charts name a (method, reward source) pair.
fn group_name(method: &str, reward_source: &str) -> String {
    if reward_source == "-" || reward_source.is_empty() {
        method.to_string()
    } else {
        format!("{method} ({reward_source})")
    }
}

fn read_summaries(dir: &Path) -> anyhow::Result<Vec<CellSummary>> {
    let path = dir.join("summary.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}: run `cargo xtask compare` for this study first", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a study summary", path.display()))
}

/// The step rows of the cells in `summaries` that are results (a diverged cell's exploding
/// norms would otherwise stretch every stability box and curve).
fn read_metrics(dir: &Path, summaries: &[CellSummary]) -> anyhow::Result<Vec<MetricRow>> {
    let mut rows = Vec::new();
    let cells = dir.join("cells");
    let mut paths: Vec<PathBuf> = summaries
        .iter()
        .filter(|s| s.is_result())
        .map(|s| cells.join(s.id()).join("metrics.csv"))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    for path in paths {
        let mut reader = csv::Reader::from_path(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let headers = reader.headers()?.clone();
        for (line, record) in reader.records().enumerate() {
            let record = record.with_context(|| format!("{} line {}", path.display(), line + 2))?;
            let field = |name: &str| headers.iter().position(|h| h == name).and_then(|i| record.get(i)).unwrap_or("");
            let parse_u64 = |name: &str| {
                field(name).parse::<u64>().with_context(|| {
                    format!("{} line {}: column {name} is not a whole number", path.display(), line + 2)
                })
            };
            let mut values = BTreeMap::new();
            for (header, value) in headers.iter().zip(record.iter()) {
                if !matches!(header, "method" | "reward_source" | "seed" | "step")
                    && let Ok(number) = value.parse::<f64>()
                {
                    values.insert(header.to_string(), number);
                }
            }
            rows.push(MetricRow {
                group: group_name(field("method"), field("reward_source")),
                step: parse_u64("step")?,
                values,
            });
        }
    }
    Ok(rows)
}

/// Accuracy of one (method, reward source) group over its seeds.
#[derive(Debug, Clone)]
struct GroupAccuracy {
    name: String,
    /// (mean, low, high) in percent, strict then lenient.
    strict: (f64, f64, f64),
    lenient: (f64, f64, f64),
    /// Across-seed standard deviation of lenient accuracy, in points.
    lenient_seed_std: f64,
}

fn group_accuracies(summaries: &[CellSummary]) -> Vec<GroupAccuracy> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&CellSummary>> = BTreeMap::new();
    for summary in summaries.iter().filter(|s| s.is_result()) {
        let name = group_name(&summary.method, &summary.reward_source);
        if !order.contains(&name) {
            order.push(name.clone());
        }
        groups.entry(name).or_default().push(summary);
    }
    let percent = |(mean, low, high): (f64, f64, f64)| (100.0 * mean, 100.0 * low, 100.0 * high);
    order
        .into_iter()
        .map(|name| {
            let cells = &groups[&name];
            // A result has its accuracies (`CellSummary::is_result`).
            let take = |f: fn(&CellSummary) -> Option<f64>| cells.iter().filter_map(|c| f(c)).collect::<Vec<f64>>();
            GroupAccuracy {
                strict: percent(eval::stats::accuracy_interval(
                    &take(|c| c.accuracy_strict),
                    &take(|c| c.accuracy_strict_ci_low),
                    &take(|c| c.accuracy_strict_ci_high),
                )),
                lenient: percent(eval::stats::accuracy_interval(
                    &take(|c| c.accuracy_lenient),
                    &take(|c| c.accuracy_lenient_ci_low),
                    &take(|c| c.accuracy_lenient_ci_high),
                )),
                lenient_seed_std: 100.0 * mean_std(&take(|c| c.accuracy_lenient)).std,
                name,
            }
        })
        .collect()
}

/// Draws a chart once into a PNG and once into an SVG, each under a temporary name then renamed,
/// so an interrupted run never leaves a half-written chart. Evaluates to the two paths.
macro_rules! both_formats {
    ($charts:expr, $name:literal, $size:expr, |$root:ident| $draw:expr) => {{
        let charts: &Path = $charts;
        let png = charts.join(concat!($name, ".png"));
        let svg = charts.join(concat!($name, ".svg"));
        let png_tmp = charts.join(concat!(".", $name, ".tmp.png"));
        let svg_tmp = charts.join(concat!(".", $name, ".tmp.svg"));
        {
            let $root = BitMapBackend::new(&png_tmp, $size).into_drawing_area();
            $root.fill(&WHITE)?;
            $draw.with_context(|| format!("drawing {}", png.display()))?;
            $root.present().map_err(|e| anyhow!("cannot write {}: {e:?}", png_tmp.display()))?;
        }
        {
            let $root = SVGBackend::new(&svg_tmp, $size).into_drawing_area();
            $root.fill(&WHITE)?;
            $draw.with_context(|| format!("drawing {}", svg.display()))?;
            $root.present().map_err(|e| anyhow!("cannot write {}: {e:?}", svg_tmp.display()))?;
        }
        std::fs::rename(&png_tmp, &png)
            .with_context(|| format!("cannot move {} to {}", png_tmp.display(), png.display()))?;
        std::fs::rename(&svg_tmp, &svg)
            .with_context(|| format!("cannot move {} to {}", svg_tmp.display(), svg.display()))?;
        [png, svg]
    }};
}

/// Renders every chart of the study in `dir`; returns the files written.
pub fn render(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    register_fonts();
    let summaries = read_summaries(dir)?;
    let metrics = read_metrics(dir, &summaries)?;
    let accuracies = group_accuracies(&summaries);
    if accuracies.is_empty() {
        bail!("{}: no cell finished without an error, so there is nothing to plot", dir.join("summary.json").display());
    }
    let charts = dir.join("charts");
    std::fs::create_dir_all(&charts).with_context(|| format!("cannot create {}", charts.display()))?;
    let mut written = Vec::new();
    written.extend(both_formats!(&charts, "accuracy", (1200, 700), |root| draw_accuracy(&root, &accuracies)));
    written.extend(both_formats!(&charts, "stability", (1200, 900), |root| draw_stability(
        &root,
        &metrics,
        &accuracies
    )));
    written.extend(both_formats!(&charts, "convergence", (1200, 1200), |root| draw_convergence(
        &root, &metrics, &summaries
    )));
    if metrics.iter().any(|row| row.values.keys().any(|key| key.contains("/auc/"))) {
        written.extend(both_formats!(&charts, "reward_model", (1200, 900), |root| draw_reward_model(&root, &metrics)));
    }
    Ok(written)
}

fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans is a valid font: registration cannot fail.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

const TITLE: u32 = 24;
const LABEL: u32 = 16;

/// Whiskered bars: strict and lenient accuracy per group.
fn draw_accuracy<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, groups: &[GroupAccuracy]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let n = groups.len();
    let top = groups.iter().map(|g| g.strict.2.max(g.lenient.2)).fold(0.0f64, f64::max);
    let y_max = ((top + 10.0) / 10.0).ceil().min(10.0) * 10.0;
    let mut chart = ChartBuilder::on(root)
        .caption("Held-out accuracy per method (mean over seeds, 95% CI)", ("sans-serif", TITLE))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..y_max)?;
    let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| label_at(&names, *x))
        .x_desc("method (reward source)")
        .y_desc("accuracy (% of held-out problems)")
        .label_style(("sans-serif", LABEL))
        .axis_desc_style(("sans-serif", LABEL))
        .draw()?;
    let series = [
        ("strict (official format)", -0.38, -0.02, BLUE.mix(0.75)),
        ("lenient (last number)", 0.02, 0.38, GREEN.mix(0.75)),
    ];
    for (index, (label, from, to, color)) in series.into_iter().enumerate() {
        let pick = |g: &GroupAccuracy| if index == 0 { g.strict } else { g.lenient };
        chart
            .draw_series(
                groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| Rectangle::new([(i as f64 + from, 0.0), (i as f64 + to, pick(g).0)], color.filled())),
            )?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        for (i, g) in groups.iter().enumerate() {
            let (_, low, high) = pick(g);
            let center = i as f64 + (from + to) / 2.0;
            chart.draw_series(whisker(center, low, high, 0.06))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", LABEL))
        .draw()?;
    Ok(())
}

/// A vertical error bar from `low` to `high` at `x`, with caps `cap` wide.
fn whisker(x: f64, low: f64, high: f64, cap: f64) -> Vec<PathElement<(f64, f64)>> {
    let style = BLACK.stroke_width(2);
    vec![
        PathElement::new(vec![(x, low), (x, high)], style),
        PathElement::new(vec![(x - cap / 2.0, low), (x + cap / 2.0, low)], style),
        PathElement::new(vec![(x - cap / 2.0, high), (x + cap / 2.0, high)], style),
    ]
}

/// The name of the group at integer position `x` ("" between groups).
fn label_at(names: &[String], x: f64) -> String {
    let index = x.round();
    if (x - index).abs() > 1e-6 || index < 0.0 {
        String::new()
    } else {
        names.get(index as usize).cloned().unwrap_or_default()
    }
}

/// Tukey box: quartiles, and whiskers to the furthest values within 1.5 IQR.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxStats {
    pub whisker_low: f64,
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
    pub whisker_high: f64,
}

/// [`BoxStats`] of the finite values; none when there are none.
pub fn box_stats(values: &[f64]) -> Option<BoxStats> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return None;
    }
    let quartiles = Quartiles::new(&finite);
    let [_, q1, median, q3, _] = quartiles.values().map(f64::from);
    let iqr = q3 - q1;
    let inside = finite.iter().copied().filter(|v| *v >= q1 - 1.5 * iqr - 1e-12 && *v <= q3 + 1.5 * iqr + 1e-12);
    let (low, high) = inside.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    Some(BoxStats { whisker_low: low.min(q1), q1, median, q3, whisker_high: high.max(q3) })
}

/// Per-step values of `metric` over every step and seed of each trained group.
fn metric_by_group(metrics: &[MetricRow], metric: &str) -> Vec<(String, Vec<f64>)> {
    let mut groups: Vec<(String, Vec<f64>)> = Vec::new();
    for row in metrics {
        let Some(value) = row.values.get(metric) else { continue };
        match groups.iter_mut().find(|(name, _)| *name == row.group) {
            Some((_, values)) => values.push(*value),
            None => groups.push((row.group.clone(), vec![*value])),
        }
    }
    groups
}

/// Box plots of three per-step quantities, and the across-seed spread of final accuracy.
fn draw_stability<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    metrics: &[MetricRow],
    accuracies: &[GroupAccuracy],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (title, body) = root.split_vertically(50);
    title.titled("Training stability: per-step quantities over all steps and seeds", ("sans-serif", TITLE))?;
    let panels = body.split_evenly((2, 2));
    let quantities = [
        ("update_norm", "update_norm: size of each step's parameter change (L2)", "L2 norm"),
        ("kl", "kl: divergence from the reference policy (nats/token)", "nats per token"),
        ("reward_std", "reward_std: spread of rewards within a step", "reward units"),
    ];
    for ((metric, caption, unit), panel) in quantities.iter().zip(&panels) {
        let groups: Vec<(String, BoxStats)> = metric_by_group(metrics, metric)
            .into_iter()
            .filter_map(|(name, values)| Some((name, box_stats(&values)?)))
            .collect();
        if groups.is_empty() {
            panel.draw(&Text::new(
                format!("{metric}: no trained method logged it"),
                (40, 60),
                ("sans-serif", LABEL),
            ))?;
            continue;
        }
        let low = groups.iter().map(|(_, b)| b.whisker_low).fold(f64::INFINITY, f64::min);
        let high = groups.iter().map(|(_, b)| b.whisker_high).fold(f64::NEG_INFINITY, f64::max);
        let pad = ((high - low) * 0.1).max(1e-6);
        let names: Vec<String> = groups.iter().map(|(name, _)| name.clone()).collect();
        let mut chart = ChartBuilder::on(panel)
            .caption(*caption, ("sans-serif", LABEL))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..(groups.len() as f64 - 0.5), (low - pad)..(high + pad))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len())
            .x_label_formatter(&|x| label_at(&names, *x))
            .y_desc(*unit)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 13))
            .draw()?;
        for (i, (_, stats)) in groups.iter().enumerate() {
            let x = i as f64;
            let color = Palette99::pick(i);
            chart.draw_series([Rectangle::new(
                [(x - 0.25, stats.q1), (x + 0.25, stats.q3)],
                color.mix(0.35).filled(),
            )])?;
            chart.draw_series([Rectangle::new([(x - 0.25, stats.q1), (x + 0.25, stats.q3)], color.stroke_width(2))])?;
            chart.draw_series([PathElement::new(
                vec![(x - 0.25, stats.median), (x + 0.25, stats.median)],
                BLACK.stroke_width(3),
            )])?;
            chart.draw_series(whisker(x, stats.whisker_low, stats.q1, 0.2))?;
            chart.draw_series(whisker(x, stats.q3, stats.whisker_high, 0.2))?;
        }
    }
    // Fourth panel: how much final accuracy moves with the seed.
    let spread_max = accuracies.iter().map(|g| g.lenient_seed_std).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let names: Vec<String> = accuracies.iter().map(|g| g.name.clone()).collect();
    let mut chart = ChartBuilder::on(&panels[3])
        .caption("Across-seed std of final lenient accuracy", ("sans-serif", LABEL))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..(accuracies.len() as f64 - 0.5), 0.0..(spread_max * 1.2).max(1.0))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(accuracies.len())
        .x_label_formatter(&|x| label_at(&names, *x))
        .y_desc("percentage points")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(accuracies.iter().enumerate().map(|(i, g)| {
        Rectangle::new(
            [
                (i as f64 - 0.3, 0.0),
                (i as f64 + 0.3, if g.lenient_seed_std.is_finite() { g.lenient_seed_std } else { 0.0 }),
            ],
            Palette99::pick(i).mix(0.7).filled(),
        )
    }))?;
    Ok(())
}

/// Mean and one standard deviation over seeds of `metric` at each step, per trained group.
fn curves(metrics: &[MetricRow], metric: &str) -> Vec<(String, Vec<(f64, f64, f64)>)> {
    let mut by_group: BTreeMap<String, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for row in metrics {
        if let Some(value) = row.values.get(metric).filter(|v| v.is_finite()) {
            if !order.contains(&row.group) {
                order.push(row.group.clone());
            }
            by_group.entry(row.group.clone()).or_default().entry(row.step).or_default().push(*value);
        }
    }
    order
        .into_iter()
        .map(|group| {
            let points = by_group[&group]
                .iter()
                .map(|(step, values)| {
                    let stats = mean_std(values);
                    (*step as f64, stats.mean, if stats.std.is_finite() { stats.std } else { 0.0 })
                })
                .collect();
            (group, points)
        })
        .collect()
}

/// The groups of `metrics` in the order they first appear (which fixes each group's colour).
fn groups_in_order(metrics: &[MetricRow]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for row in metrics {
        if !names.contains(&row.group) {
            names.push(row.group.clone());
        }
    }
    names
}

/// Reward and held-out accuracy against step, with convergence points.
fn draw_convergence<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    metrics: &[MetricRow],
    summaries: &[CellSummary],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (title, body) = root.split_vertically(50);
    title.titled(
        "Convergence: mean over seeds, band = ±1 std; ◆ = median steps to convergence",
        ("sans-serif", TITLE),
    )?;
    let third = body.dim_in_pixel().1 / 3;
    let (upper, rest) = body.split_vertically(third);
    let (middle, lower) = rest.split_vertically(third);
    let all_groups = groups_in_order(metrics);
    let convergence: BTreeMap<String, f64> = all_groups
        .iter()
        .filter_map(|group| {
            let mut steps: Vec<f64> = summaries
                .iter()
                .filter(|s| s.is_result() && group_name(&s.method, &s.reward_source) == *group)
                .filter_map(|s| s.steps_to_convergence.map(|v| v as f64))
                .collect();
            steps.sort_by(f64::total_cmp);
            (!steps.is_empty()).then(|| (group.clone(), steps[steps.len() / 2]))
        })
        .collect();
    let panels = [
        (&upper, "reward", "Training reward (mean of the step's completions)", "reward", true),
        (
            &middle,
            "eval/accuracy_strict",
            "Held-out accuracy during training (strict: the official answer format, greedy)",
            "accuracy (%)",
            false,
        ),
        (
            &lower,
            "eval/accuracy_lenient",
            "Held-out accuracy during training (lenient: the last number, greedy)",
            "accuracy (%)",
            false,
        ),
    ];
    for (panel, metric, caption, unit, mark) in panels {
        let series = curves(metrics, metric);
        if series.is_empty() {
            panel.draw(&Text::new(
                format!("{caption}: not logged (set `eval_every` on a method to evaluate during training)"),
                (40, 60),
                ("sans-serif", LABEL),
            ))?;
            continue;
        }
        let scale = if metric.starts_with("eval/") { 100.0 } else { 1.0 };
        let marks = if mark { convergence.clone() } else { BTreeMap::new() };
        draw_curves(panel, &series, (caption, unit), scale, &all_groups, &marks)?;
    }
    Ok(())
}

/// One panel of lines, each a group's mean with a band of one standard deviation, scaled by
/// `scale`; a group's colour is its index in `groups`, and `marks` puts a diamond on its line at
/// a step.
fn draw_curves<DB: DrawingBackend>(
    panel: &DrawingArea<DB, Shift>,
    series: &[(String, Vec<(f64, f64, f64)>)],
    (caption, unit): (&str, &str),
    scale: f64,
    groups: &[String],
    marks: &BTreeMap<String, f64>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let x_max = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).fold(1.0f64, f64::max);
    let low = series.iter().flat_map(|(_, p)| p.iter().map(|q| (q.1 - q.2) * scale)).fold(f64::INFINITY, f64::min);
    let high = series.iter().flat_map(|(_, p)| p.iter().map(|q| (q.1 + q.2) * scale)).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((high - low) * 0.08).max(1e-3);
    let mut chart = ChartBuilder::on(panel)
        .caption(caption, ("sans-serif", LABEL))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (low - pad)..(high + pad))?;
    chart
        .configure_mesh()
        .x_desc("training step (optimizer updates)")
        .y_desc(unit)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    for (index, (group, points)) in series.iter().enumerate() {
        let color = Palette99::pick(groups.iter().position(|g| g == group).unwrap_or(index)).to_rgba();
        let mut band: Vec<(f64, f64)> = points.iter().map(|(x, m, s)| (*x, (m + s) * scale)).collect();
        band.extend(points.iter().rev().map(|(x, m, s)| (*x, (m - s) * scale)));
        chart.draw_series([Polygon::new(band, color.mix(0.15).filled())])?;
        chart
            .draw_series(LineSeries::new(points.iter().map(|(x, m, _)| (*x, m * scale)), color.stroke_width(2)))?
            .label(group.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
        if let Some(step) = marks.get(group) {
            let nearest = points.iter().min_by(|a, b| (a.0 - step).abs().total_cmp(&(b.0 - step).abs()));
            if let Some((x, m, _)) = nearest {
                chart.draw_series([Polygon::new(
                    diamond(*x, m * scale, x_max * 0.008, (high - low + 2.0 * pad) * 0.02),
                    color.filled(),
                )])?;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// A learned reward judged by a rule check on the completions it scored: each logged
/// `rewards/<fn>/auc/<check>` (and `auc_within_prompt`, over pairs of one prompt's completions)
/// against step, and each such check's mean (every group that logs it,
/// those trained on the check itself included).
fn draw_reward_model<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, metrics: &[MetricRow]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (title, body) = root.split_vertically(50);
    title.titled(
        "Learned reward against the rule check, on each step's completions (mean over seeds, band = ±1 std)",
        ("sans-serif", TITLE),
    )?;
    let (upper, lower) = body.split_vertically(body.dim_in_pixel().1 / 2);
    let is_auc = |key: &String| key.contains("/auc/") || key.contains("/auc_within_prompt/");
    let mut auc_keys: Vec<String> =
        metrics.iter().flat_map(|row| row.values.keys().filter(|key| is_auc(key)).cloned()).collect();
    auc_keys.sort();
    auc_keys.dedup();
    // "rewards/<fn>/auc/<check>" -> (fn, check); "rewards/<fn>/auc_within_prompt/<check>" ->
    // (fn, "<check> within prompt")
    let parts = |key: &str| {
        let rest = key.trim_start_matches("rewards/");
        match rest.split_once("/auc_within_prompt/") {
            Some((function, check)) => (function.to_string(), check.to_string(), " within prompt"),
            None => {
                let (function, check) = rest.split_once("/auc/").unwrap_or((rest, ""));
                (function.to_string(), check.to_string(), "")
            }
        }
    };
    let mut checks: Vec<String> = auc_keys.iter().map(|key| parts(key).1).collect();
    checks.sort();
    checks.dedup();
    let label = |group: String, detail: String, many: bool| if many { format!("{group}: {detail}") } else { group };
    let auc: Vec<_> = auc_keys
        .iter()
        .flat_map(|key| {
            let (function, check, scope) = parts(key);
            curves(metrics, key)
                .into_iter()
                .map(move |(group, points)| (group, format!("{function} vs {check}{scope}"), points))
        })
        .collect();
    let correctness: Vec<_> = checks
        .iter()
        .flat_map(|check| {
            curves(metrics, &format!("rewards/{check}/mean"))
                .into_iter()
                .map(move |(group, points)| (group, check.clone(), points))
        })
        .collect();
    let groups = groups_in_order(metrics);
    let relabel = |series: Vec<(String, String, Vec<(f64, f64, f64)>)>, many: bool| -> Vec<_> {
        series.into_iter().map(|(group, detail, points)| (label(group, detail, many), points)).collect()
    };
    let auc = relabel(auc, auc_keys.len() > 1);
    let correctness = relabel(correctness, checks.len() > 1);
    draw_curves(
        &upper,
        &auc,
        (
            "Ranking AUC of the learned reward against the check (0.5 = chance, 1 = separates right from wrong; step-wide, or within each prompt)",
            "AUC",
        ),
        1.0,
        &groups,
        &BTreeMap::new(),
    )?;
    draw_curves(
        &lower,
        &correctness,
        ("Share of the step's completions the check passes (the truth the learned reward should track)", "share"),
        1.0,
        &groups,
        &BTreeMap::new(),
    )?;
    Ok(())
}

fn diamond(x: f64, y: f64, dx: f64, dy: f64) -> Vec<(f64, f64)> {
    vec![(x - dx, y), (x, y + dy), (x + dx, y), (x, y - dy)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reward-model chart draws the AUC of each cell that logs one and the check's share for
    /// every cell that logs the check.
    #[test]
    fn the_reward_model_chart_ranks_the_learned_reward_against_the_check() {
        register_fonts();
        let row = |group: &str, step: u64, values: &[(&str, f64)]| MetricRow {
            group: group.to_string(),
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        let metrics = vec![
            row(
                "ppo (reward_model)",
                1,
                &[("rewards/reward_model/auc/lenient_correct", 0.8), ("rewards/lenient_correct/mean", 0.2)],
            ),
            row(
                "ppo (reward_model)",
                2,
                &[("rewards/reward_model/auc/lenient_correct", 0.55), ("rewards/lenient_correct/mean", 0.1)],
            ),
            row("ppo (lenient)", 1, &[("rewards/lenient_correct/mean", 0.2)]),
            row("ppo (lenient)", 2, &[("rewards/lenient_correct/mean", 0.3)]),
            row(
                "grpo (reward_model)",
                1,
                &[
                    ("rewards/reward_model/auc/lenient_correct", 0.4),
                    ("rewards/reward_model/auc_within_prompt/lenient_correct", 0.9),
                    ("rewards/lenient_correct/mean", 0.1),
                ],
            ),
        ];
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1200, 900)).into_drawing_area();
            root.fill(&WHITE).unwrap();
            draw_reward_model(&root, &metrics).unwrap();
            root.present().unwrap();
        }
        let document = roxmltree::Document::parse(&svg).unwrap();
        let text: String = document.descendants().filter_map(|node| node.text()).collect::<Vec<_>>().join(" ");
        for label in ["Ranking AUC", "ppo (reward_model)", "ppo (lenient)", "Share of the step"] {
            assert!(text.contains(label), "{label:?} missing: {text}");
        }
        // Legend entries: the reward-model cell in both panels, the rule-reward cell in the share's
        // only.
        let (lenient, learned) = (text.matches("ppo (lenient)").count(), text.matches("ppo (reward_model)").count());
        assert!(lenient > 0 && learned == 2 * lenient, "{lenient} vs {learned}: {text}");
        // GRPO's groups give the within-prompt AUC a line of its own beside the step-wide one.
        assert!(text.contains("lenient_correct within prompt"), "{text}");
        assert_eq!(text.matches("grpo (reward_model)").count(), 3 * lenient, "{text}");
    }

    #[test]
    fn box_stats_follow_tukey() {
        let stats = box_stats(&[1.0, 2.0, 3.0, 4.0, 100.0, f64::NAN]).unwrap();
        assert_eq!((stats.q1, stats.median, stats.q3), (2.0, 3.0, 4.0));
        // 100 lies beyond q3 + 1.5 IQR = 7: the whisker stops at 4.
        assert_eq!((stats.whisker_low, stats.whisker_high), (1.0, 4.0));
        assert!(box_stats(&[f64::NAN]).is_none());
    }
}
