//! Human tables, vzlist style: no borders, one space between columns, text left- and numbers
//! right-aligned (headers with their column), no trailing blanks.

use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, Table};

/// How a column aligns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// The table of `rows` under `headers` (none with `header` false), one line each.
pub fn render(headers: &[(&str, Align)], rows: Vec<Vec<String>>, header: bool) -> String {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    if header {
        t.set_header(headers.iter().map(|(h, _)| *h));
    }
    for r in rows {
        t.add_row(r);
    }
    for (i, (_, align)) in headers.iter().enumerate() {
        if let Some(c) = t.column_mut(i) {
            c.set_padding((0, 1));
            c.set_cell_alignment(match align {
                Align::Left => CellAlignment::Left,
                Align::Right => CellAlignment::Right,
            });
            c.set_constraint(ColumnConstraint::ContentWidth);
        }
    }
    let mut out = String::new();
    for line in t.lines() {
        // The last column's padding (and a left-aligned last cell's fill) are not output.
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
