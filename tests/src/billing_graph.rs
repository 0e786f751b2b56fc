//! Reading back `berth billing graph`'s pictures: where the SVG draws the 95th line and what
//! value its y axis gives that height (from the tick labels the reader sees), and which rows of
//! the PNG carry a full-width red line.

use anyhow::{Context, Result, bail, ensure};

/// The value of `name="…"` in one tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    tag[at..].split('"').next()
}

/// Each `<el …>` tag of the document with the text up to the next tag.
fn elements<'a>(doc: &'a str, el: &str) -> Vec<(&'a str, &'a str)> {
    let open = format!("<{el} ");
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i..];
        let Some(end) = rest.find('>') else { break };
        let tag = &rest[..end];
        let text = rest[end + 1..].split('<').next().unwrap_or("").trim();
        out.push((tag, text));
        rest = &rest[end..];
    }
    out
}

/// The 95th line and the y axis of an SVG chart.
#[derive(Debug, Clone)]
pub struct SvgChart {
    /// The y of the full-width red line.
    pub p95_y: f64,
    /// (y, bit/s) of every y tick label.
    pub ticks: Vec<(f64, f64)>,
}

impl SvgChart {
    pub fn read(svg: &str) -> Result<SvgChart> {
        let mut lines = Vec::new();
        for (tag, _) in elements(svg, "polyline") {
            if attr(tag, "stroke") != Some("#FF0000") {
                continue;
            }
            let pts: Vec<(f64, f64)> = attr(tag, "points")
                .context("polyline without points")?
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').context("bad point")?;
                    Ok((x.parse()?, y.parse()?))
                })
                .collect::<Result<_>>()?;
            if let [(x0, y0), (x1, y1)] = pts[..]
                && y0 == y1
                && x1 - x0 > 300.0
            {
                lines.push(y0);
            }
        }
        let [p95_y] = lines[..] else {
            bail!("{} full-width red lines, wanted one", lines.len());
        };
        let texts = elements(svg, "text");
        let unit = texts
            .iter()
            .find_map(|(_, t)| t.strip_suffix(" (5-minute average)"))
            .context("no y axis description")?;
        let div = match unit {
            "bit/s" => 1.0,
            "kbit/s" => 1e3,
            "Mbit/s" => 1e6,
            "Gbit/s" => 1e9,
            u => bail!("unknown y unit {u:?}"),
        };
        let mut ticks = Vec::new();
        for (tag, t) in &texts {
            if attr(tag, "text-anchor") == Some("end")
                && let Ok(v) = t.trim().parse::<f64>()
            {
                ticks.push((attr(tag, "y").context("text without y")?.parse()?, v * div));
            }
        }
        ensure!(ticks.len() >= 3, "y ticks {ticks:?}");
        Ok(SvgChart { p95_y, ticks })
    }

    /// The axis' value at `y` (through the lowest and the highest tick label, every other label
    /// checked to lie on that line within a pixel), and the value of one pixel.
    pub fn value_at(&self, y: f64) -> Result<(f64, f64)> {
        let by_y = |a: &&(f64, f64), b: &&(f64, f64)| a.0.total_cmp(&b.0);
        let lo = self.ticks.iter().max_by(by_y).context("no ticks")?;
        let hi = self.ticks.iter().min_by(by_y).context("no ticks")?;
        let per_px = (hi.1 - lo.1) / (lo.0 - hi.0);
        ensure!(per_px > 0.0, "y axis upside down: {:?}", self.ticks);
        let at = |y: f64| lo.1 + (lo.0 - y) * per_px;
        for t in &self.ticks {
            ensure!(
                (at(t.0) - t.1).abs() <= per_px,
                "tick {t:?} off the axis line ({:?})",
                self.ticks
            );
        }
        Ok((at(y), per_px))
    }
}

/// The PNG's size and the rows holding at least 300 pure red pixels (the 95th line; the legend's
/// red sample is 20 pixels).
pub fn png_red_rows(png_bytes: &[u8]) -> Result<((u32, u32), Vec<u32>)> {
    let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = dec.read_info().context("not a PNG")?;
    let mut buf = vec![0; reader.output_buffer_size().context("PNG too large")?];
    let info = reader.next_frame(&mut buf).context("decoding the PNG")?;
    ensure!(
        info.color_type == png::ColorType::Rgb && info.bit_depth == png::BitDepth::Eight,
        "PNG of {:?}/{:?}",
        info.color_type,
        info.bit_depth
    );
    let (w, h) = (info.width, info.height);
    let rows = (0..h)
        .filter(|&y| {
            let row = &buf[(y * w * 3) as usize..((y + 1) * w * 3) as usize];
            row.chunks(3).filter(|p| *p == [255, 0, 0]).count() >= 300
        })
        .collect();
    Ok(((w, h), rows))
}

/// Tags balance and there is one root element: the structure of an XML document (no XML parser
/// among the dependencies).
pub fn well_formed(doc: &str) -> Result<()> {
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = doc.trim();
    while let Some(lt) = rest.find('<') {
        let gt = rest[lt..].find('>').context("unclosed tag")? + lt;
        let tag = &rest[lt + 1..gt];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop();
            ensure!(open == Some(name.trim()), "</{name}> closes {open:?}");
        } else if !tag.starts_with('?') && !tag.starts_with('!') {
            let name = tag.split_whitespace().next().context("empty tag")?;
            roots += usize::from(stack.is_empty());
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        rest = &rest[gt + 1..];
    }
    ensure!(
        stack.is_empty() && roots == 1 && rest.trim().is_empty(),
        "{stack:?}, {roots} roots"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use berth::billing::graph::{render_png, render_svg};
    use berth::billing::{
        Baseline, BillingAnchor, Counter, CounterKey, CtInfo, CtReading, Direction, Family, Ledger,
        LedgerOptions, P95Mode, Reading,
    };

    use super::*;

    /// 2026-03-01T00:00:00Z.
    const MAR1: i64 = 1_772_323_200;

    /// 21 slots carrying 3000·j bytes in (80·j bit/s) and 100·j out: n = 21, k = ⌈95·21/100⌉ =
    /// 20, the 20th smallest inbound rate is 80·19 = 1520 bit/s (the max, 1600, is 18 pixels
    /// higher on this chart). Both pictures must put the line there.
    #[test]
    fn the_95th_line_reads_its_value_on_the_axis() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut l = Ledger::open(&dir.path().join("l.db"), LedgerOptions::default())?;
        let uuid = "00000002-0000-4000-8000-000000000000".to_string();
        l.register_ct(&CtInfo {
            uuid: uuid.clone(),
            ctid: 8,
            anchor: BillingAnchor::Day(1),
            tz: "UTC".into(),
            created: MAR1,
            destroyed: None,
            commit_bps: None,
            classes: None,
            history: Vec::new(),
        })?;
        let (i, o) = (
            CounterKey::new(Direction::In, 0, Family::V4),
            CounterKey::new(Direction::Out, 0, Family::V4),
        );
        let (mut ci, mut co) = (0u64, 0u64);
        for n in 0..=20u64 {
            ci += 3000 * n;
            co += 100 * n;
            l.tick(&[CtReading {
                uuid: uuid.clone(),
                reading: Reading {
                    at: MAR1 + 300 * n as i64,
                    epoch: 1,
                    counters: [(i, Counter::new(ci, 1)), (o, Counter::new(co, 1))]
                        .into_iter()
                        .collect(),
                },
                first: Baseline::Zero,
            }])?;
        }
        let p = l.period_spec(&uuid)?.clone().period_of(MAR1)?;
        let now = MAR1 + 300 * 20 + 1;
        let r = l.report(&uuid, &p, P95Mode::Max, None, now)?;
        ensure!(r.p95.bps == 1520, "{:?}", r.p95);
        let rows = l.slots(&uuid, p.start, p.end)?;
        let svg = render_svg(&r, &rows)?;
        well_formed(&svg)?;
        let chart = SvgChart::read(&svg)?;
        let (v, per_px) = chart.value_at(chart.p95_y)?;
        ensure!(
            (v - 1520.0).abs() <= per_px,
            "line reads {v} ({per_px}/px): {chart:?}"
        );
        ensure!(
            80.0 > 4.0 * per_px,
            "the chart cannot tell 1520 from 1600: {per_px}/px"
        );
        let (size, rows) = png_red_rows(&render_png(&r, &rows)?)?;
        ensure!(
            size == (1200, 500) && rows == [chart.p95_y as u32],
            "{size:?} {rows:?}"
        );
        Ok(())
    }

    #[test]
    fn the_checker_rejects_broken_documents() {
        assert!(well_formed("<svg><g/><text>a</text></svg>").is_ok());
        for bad in ["<svg><g></svg>", "<svg></g>", "<svg/><svg/>", "<svg"] {
            assert!(well_formed(bad).is_err(), "{bad}");
        }
    }
}
