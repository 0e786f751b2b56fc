//! `berth billing graph`: a CT's period as a chart (SVG or PNG) of its 5-minute inbound and
//! outbound rates with the billed 95th (mode `max`: the larger direction's) as a labelled line,
//! and the commit rate when the CT has one. Only the classes the CT is billed for are drawn:
//! the 95th is taken over them.

mod canvas;

use std::collections::BTreeMap;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{BillingError, Direction, PeriodSpec, Report, SLOT_SECS, SlotRow, bytes_to_bps};

const DAY: f64 = 86_400.0;

/// (days since the period's start, bit/s) of each slot.
pub type Series = Vec<(f64, f64)>;

/// Bits per second of every slot of the report's window, in and out (missing slots as 0, as
/// the 95th counts them), as (days since the period's start, bit/s).
pub fn slot_rates(report: &Report, rows: &[SlotRow]) -> (Series, Series) {
    let mut by_slot: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| report.window.contains(r.slot_start) && report.ct.bills_class(r.key.class))
    {
        let e = by_slot.entry(r.slot_start).or_default();
        match r.key.direction {
            Direction::In => e.0 += r.counter.bytes,
            Direction::Out => e.1 += r.counter.bytes,
        }
    }
    let (mut ins, mut outs) = (Vec::new(), Vec::new());
    let mut slot = report.window.first;
    while slot < report.window.end {
        let (i, o) = by_slot.get(&slot).copied().unwrap_or_default();
        let x = (slot - report.period.start) as f64 / DAY;
        ins.push((x, bytes_to_bps(i) as f64));
        outs.push((x, bytes_to_bps(o) as f64));
        slot += SLOT_SECS;
    }
    (ins, outs)
}

/// The label of the 95th line; the chart carries it verbatim.
pub fn p95_label(report: &Report) -> String {
    format!(
        "95th percentile ({}): {} bit/s",
        report.p95.mode.as_str(),
        report.p95.bps
    )
}

/// The picture's size in pixels (SVG and PNG alike).
pub const SIZE: (u32, u32) = (1200, 500);

/// The file formats `berth billing graph` writes, by the output's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Svg,
    Png,
}

impl Format {
    /// `.svg` or `.png` (any case); anything else is `None`.
    pub fn of(path: &std::path::Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "svg" => Some(Format::Svg),
            "png" => Some(Format::Png),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Svg => "svg",
            Format::Png => "png",
        }
    }
}

/// The y axis' unit: the largest of bit/s, kbit/s, Mbit/s, Gbit/s that the chart's top reaches,
/// as (divisor, name).
pub fn y_unit(top: f64) -> (f64, &'static str) {
    [(1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")]
        .into_iter()
        .find(|(d, _)| top >= *d)
        .unwrap_or((1.0, "bit/s"))
}

/// A tick value in the axis' unit: at most 3 decimals, trailing zeros dropped.
fn tick_label(v: f64, unit: f64) -> String {
    let s = format!("{:.3}", v / unit);
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The SVG document of `report` (mode `max` for the line) over its slot `rows`.
pub fn render_svg(report: &Report, rows: &[SlotRow]) -> Result<String, BillingError> {
    let mut svg = String::new();
    draw(
        SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(),
        report,
        rows,
    )?;
    Ok(svg)
}

/// The same picture as [`render_svg`], as a PNG.
pub fn render_png(report: &Report, rows: &[SlotRow]) -> Result<Vec<u8>, BillingError> {
    let mut px = canvas::pixels(SIZE.0, SIZE.1);
    draw(
        canvas::Canvas::new(SIZE.0, SIZE.1, &mut px).into_drawing_area(),
        report,
        rows,
    )?;
    canvas::png(SIZE.0, SIZE.1, &px).map_err(|e| BillingError::Graph {
        uuid: report.ct.uuid.clone(),
        detail: format!("encoding the PNG: {e}"),
    })
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    report: &Report,
    rows: &[SlotRow],
) -> Result<(), BillingError> {
    let ct = &report.ct;
    let spec = PeriodSpec::with_history(&ct.history, ct.anchor, &ct.tz, ct.created)?;
    let start = spec.rfc3339(report.period.start)?;
    let (ins, outs) = slot_rates(report, rows);
    let p95 = report.p95.bps as f64;
    let top = ins
        .iter()
        .chain(&outs)
        .map(|p| p.1)
        .fold(p95, f64::max)
        .max(report.commit_bps.unwrap_or(0) as f64)
        .max(1.0)
        * 1.1;
    let (unit, unit_name) = y_unit(top);
    let days = ((report.period.end - report.period.start) as f64 / DAY).max(1.0 / 288.0);
    let err = |e: &dyn std::fmt::Display| BillingError::Graph {
        uuid: report.ct.uuid.clone(),
        detail: e.to_string(),
    };
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let caption = format!(
        "CT {} ({}), billing period {}",
        report.ct.ctid,
        report.ct.uuid,
        report.period.label()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..days, 0f64..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(format!("days since {start}"))
        .y_desc(format!("{unit_name} (5-minute average)"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 16))
        .y_label_formatter(&|v| tick_label(*v, unit))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(ins, &BLUE))
        .map_err(|e| err(&e))?
        .label("inbound")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(outs, &GREEN))
        .map_err(|e| err(&e))?
        .label("outbound")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .draw_series(LineSeries::new([(0.0, p95), (days, p95)], &RED))
        .map_err(|e| err(&e))?
        .label(p95_label(report))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    if let Some(c) = report.commit_bps {
        let c_y = c as f64;
        chart
            .draw_series(LineSeries::new([(0.0, c_y), (days, c_y)], &MAGENTA))
            .map_err(|e| err(&e))?
            .label(format!(
                "commit: {c} bit/s ({} slots over)",
                report.p95.slots_over_commit
            ))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{
        Baseline, BillingAnchor, Counter, CounterKey, CtInfo, CtReading, Family, Ledger,
        LedgerOptions, P95Mode, Reading,
    };
    use super::*;

    /// 2026-03-01T00:00:00Z.
    const MAR1: i64 = 1_772_323_200;

    /// Tags balance, one root element, `&` only in entities: enough of XML's well-formedness
    /// to catch a broken writer (no XML parser among the dependencies).
    fn well_formed(doc: &str) -> Result<(), String> {
        let mut stack: Vec<&str> = Vec::new();
        let mut roots = 0;
        let mut rest = doc.trim();
        while !rest.is_empty() {
            let Some(lt) = rest.find('<') else {
                return check_text(rest).and(if stack.is_empty() {
                    Err(format!("text after the root: {rest:?}"))
                } else {
                    Ok(())
                });
            };
            check_text(&rest[..lt])?;
            let gt = rest[lt..].find('>').ok_or("unclosed tag")? + lt;
            let tag = &rest[lt + 1..gt];
            if tag.starts_with('?') || tag.starts_with('!') {
            } else if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(open) if open == name.trim() => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
            } else {
                let name = tag.split_whitespace().next().ok_or("empty tag")?;
                let name = name.trim_end_matches('/');
                if stack.is_empty() {
                    roots += 1;
                }
                if !tag.ends_with('/') {
                    stack.push(name);
                }
                check_text(tag)?;
            }
            rest = &rest[gt + 1..];
        }
        match (stack.is_empty(), roots) {
            (true, 1) => Ok(()),
            _ => Err(format!("unclosed {stack:?} or {roots} roots")),
        }
    }

    fn check_text(t: &str) -> Result<(), String> {
        for (i, _) in t.match_indices('&') {
            let ent = &t[i..t[i..].find(';').map_or(t.len(), |e| i + e + 1)];
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&ent)
                || (ent.starts_with("&#") && ent.ends_with(';'));
            if !ok {
                return Err(format!("bare & in {t:?}"));
            }
        }
        Ok(())
    }

    #[test]
    fn format_by_extension_and_axis_units() {
        use std::path::Path;
        assert_eq!(Format::of(Path::new("a/b.svg")), Some(Format::Svg));
        assert_eq!(Format::of(Path::new("b.PNG")), Some(Format::Png));
        for bad in ["b.jpg", "b", "b.svg.tmp", ".png/x"] {
            assert_eq!(Format::of(Path::new(bad)), None, "{bad}");
        }
        assert_eq!(y_unit(999.0), (1.0, "bit/s"));
        assert_eq!(y_unit(1000.0), (1e3, "kbit/s"));
        assert_eq!(y_unit(8.4e6), (1e6, "Mbit/s"));
        assert_eq!(y_unit(2e10), (1e9, "Gbit/s"));
        assert_eq!(tick_label(2_500_000.0, 1e6), "2.5");
        assert_eq!(tick_label(3_000_000.0, 1e6), "3");
        assert_eq!(tick_label(0.0, 1e3), "0");
    }

    #[test]
    fn the_checker_rejects_broken_documents() {
        assert!(well_formed("<svg><g/><text>a &amp; b</text></svg>").is_ok());
        for bad in [
            "<svg><g></svg>",
            "<svg></g>",
            "<svg/><svg/>",
            "<svg>a & b</svg>",
            "<svg",
        ] {
            assert!(well_formed(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn svg_and_png_have_both_directions_and_the_95th() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.db"), LedgerOptions::default()).unwrap();
        let uuid = "00000001-0000-4000-8000-000000000000".to_string();
        l.register_ct(&CtInfo {
            uuid: uuid.clone(),
            ctid: 7,
            anchor: BillingAnchor::Day(1),
            tz: "UTC".into(),
            created: MAR1,
            destroyed: None,
            commit_bps: None,
            classes: None,
            history: Vec::new(),
        })
        .unwrap();
        let (i, o) = (
            CounterKey::new(Direction::In, 0, Family::V4),
            CounterKey::new(Direction::Out, 1, Family::V6),
        );
        // Slot j (0..20) carries 3000·j bytes in (80·j bit/s) and 1500·j out.
        let (mut ci, mut co) = (0u64, 0u64);
        for n in 0..=20i64 {
            ci += 3000 * n as u64;
            co += 1500 * n as u64;
            let counters = [(i, Counter::new(ci, 1)), (o, Counter::new(co, 1))];
            l.tick(&[CtReading {
                uuid: uuid.clone(),
                reading: Reading {
                    at: MAR1 + 300 * n,
                    epoch: 1,
                    counters: counters.into_iter().collect(),
                },
                first: Baseline::Zero,
            }])
            .unwrap();
        }
        let spec = l.period_spec(&uuid).unwrap().clone();
        let p = spec.period_of(MAR1).unwrap();
        let now = MAR1 + 300 * 20 + 1;
        let r = l.report(&uuid, &p, P95Mode::Max, None, now).unwrap();
        let rows = l.slots(&uuid, p.start, p.end).unwrap();
        let (ins, outs) = slot_rates(&r, &rows);
        assert_eq!(ins.len(), 21, "{ins:?}");
        let sum = |s: &Series| s.iter().map(|p| p.1).sum::<f64>();
        assert_eq!((sum(&ins), sum(&outs)), (80.0 * 210.0, 40.0 * 210.0));
        // n = 21, k = 20: the 20th smallest inbound slot, 80·19 bit/s.
        assert_eq!(r.p95.bps, 1520, "{:?}", r.p95);
        let svg = render_svg(&r, &rows).unwrap();
        let png = render_png(&r, &rows).unwrap();
        // BERTH_GRAPH_DUMP=DIR keeps both pictures, to look at.
        if let Ok(d) = std::env::var("BERTH_GRAPH_DUMP") {
            std::fs::write(format!("{d}/graph.svg"), &svg).unwrap();
            std::fs::write(format!("{d}/graph.png"), &png).unwrap();
        }
        // The PNG: the same picture, its 95th line on the row the SVG draws it (both share
        // plotters' layout), text drawn near the caption's place.
        let red_y = svg
            .split("<polyline")
            .filter(|p| p.contains("stroke=\"#FF0000\""))
            .filter_map(|p| p.split("points=\"").nth(1)?.split('"').next())
            .filter_map(|pts| {
                let ys: Vec<&str> = pts
                    .split_whitespace()
                    .filter_map(|p| p.split(',').nth(1))
                    .collect();
                let xs: Vec<u32> = pts
                    .split_whitespace()
                    .filter_map(|p| p.split(',').next()?.parse().ok())
                    .collect();
                (ys.len() == 2 && ys[0] == ys[1] && xs[1] - xs[0] > 300)
                    .then(|| ys[0].parse::<u32>().ok())?
            })
            .collect::<Vec<_>>();
        assert_eq!(red_y.len(), 1, "{red_y:?}");
        let mut reader = png::Decoder::new(std::io::Cursor::new(&png))
            .read_info()
            .unwrap();
        let mut px = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut px).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        let row = |y: u32| &px[(y * SIZE.0 * 3) as usize..((y + 1) * SIZE.0 * 3) as usize];
        let count = |y: u32, c: [u8; 3]| row(y).chunks(3).filter(|p| *p == c).count();
        let red: Vec<u32> = (0..SIZE.1)
            .filter(|&y| count(y, [255, 0, 0]) >= 300)
            .collect();
        assert_eq!(red, red_y, "PNG red rows vs the SVG's 95th line");
        let any = |c: [u8; 3]| (0..SIZE.1).any(|y| count(y, c) > 0);
        assert!(
            any([0, 0, 255]) && any([0, 255, 0]),
            "no inbound or outbound line"
        );
        let caption_ink: usize = (15..45).map(|y| count(y, [0, 0, 0])).sum();
        assert!(
            caption_ink > 500,
            "caption text: {caption_ink} black pixels"
        );
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        well_formed(&svg).unwrap();
        assert!(svg.contains(&p95_label(&r)), "no 95th label");
        assert!(svg.contains("inbound") && svg.contains("outbound"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        assert!(
            !svg.contains("commit:"),
            "a commit line without a commit rate"
        );

        // Billed for class 1 only (the outbound rows) with a commit rate: the inbound series
        // is all zero, and the commit line is labelled with the slots over it.
        let mut info = l.ct(&uuid).unwrap().clone();
        info.classes = Some(vec![1]);
        info.commit_bps = Some(500);
        l.register_ct(&info).unwrap();
        let r = l.report(&uuid, &p, P95Mode::Max, None, now).unwrap();
        let (ins, outs) = slot_rates(&r, &rows);
        assert_eq!((sum(&ins), sum(&outs)), (0.0, 40.0 * 210.0));
        // Outbound 40·j bit/s: slots 13..=20 are over 500.
        assert_eq!((r.p95.bps, r.p95.slots_over_commit), (760, 8));
        let svg = render_svg(&r, &rows).unwrap();
        well_formed(&svg).unwrap();
        assert!(
            svg.contains("commit: 500 bit/s (8 slots over)"),
            "no commit label"
        );
    }
}
