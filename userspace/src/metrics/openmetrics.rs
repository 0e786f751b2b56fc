//! OpenMetrics 1.0 text exposition of the `prometheus` crate's metric families (the crate
//! writes only the older Prometheus text format). Only what berthd exports is needed:
//! counters and gauges, no exemplars, no `_created`.

use std::fmt::Write;

use prometheus::proto::{MetricFamily, MetricType};

/// Escapes a label value or help text (`\`, `"` and newline).
fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn number(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Appends `families` in OpenMetrics text format, `# EOF` included.
pub fn encode(families: &[MetricFamily], out: &mut String) {
    for f in families {
        let name = f.name();
        let (kind, family_name) = match f.get_field_type() {
            // OpenMetrics names a counter family without the `_total` its samples carry.
            MetricType::COUNTER => ("counter", name.strip_suffix("_total").unwrap_or(name)),
            MetricType::GAUGE => ("gauge", name),
            _ => ("unknown", name),
        };
        let _ = writeln!(out, "# TYPE {family_name} {kind}");
        out.push_str("# HELP ");
        out.push_str(family_name);
        out.push(' ');
        escape(f.help(), out);
        out.push('\n');
        for m in f.get_metric() {
            let value = match f.get_field_type() {
                MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            };
            out.push_str(name);
            let labels = m.get_label();
            if !labels.is_empty() {
                out.push('{');
                for (i, p) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(p.name());
                    out.push_str("=\"");
                    escape(p.value(), out);
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            number(value, out);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
}

#[cfg(test)]
mod tests {
    use prometheus::proto::{Counter, Gauge, LabelPair, Metric};

    use super::*;

    #[test]
    fn counters_gauges_escaping_and_eof() {
        let mut c = MetricFamily::default();
        c.set_name("x_bytes_total".into());
        c.set_help("a \"help\"\nline \\".into());
        c.set_field_type(MetricType::COUNTER);
        let mut lp = LabelPair::default();
        lp.set_name("ctid".into());
        lp.set_value("1\"\n\\".into());
        let mut m = Metric::from_label(vec![lp]);
        let mut cv = Counter::default();
        cv.set_value(12345678901.0);
        m.set_counter(cv);
        c.mut_metric().push(m);

        let mut g = MetricFamily::default();
        g.set_name("y_seconds".into());
        g.set_help("h".into());
        g.set_field_type(MetricType::GAUGE);
        let mut m = Metric::default();
        let mut gv = Gauge::default();
        gv.set_value(0.25);
        m.set_gauge(gv);
        g.mut_metric().push(m);

        let mut out = String::new();
        encode(&[c, g], &mut out);
        assert_eq!(
            out,
            "# TYPE x_bytes counter\n\
             # HELP x_bytes a \\\"help\\\"\\nline \\\\\n\
             x_bytes_total{ctid=\"1\\\"\\n\\\\\"} 12345678901\n\
             # TYPE y_seconds gauge\n\
             # HELP y_seconds h\n\
             y_seconds 0.25\n\
             # EOF\n"
        );
    }
}
