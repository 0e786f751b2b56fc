//! A plain RGB raster for plotters, drawn pixel by pixel, whose text is the public-domain 8×8
//! bitmap font of the font8x8 crate: a PNG needs no system font and no font file this way.
//! Text extents stay plotters' own estimate (its font-less layout, the one the SVG backend gets
//! too), so the PNG and the SVG of a chart put every element at the same pixel; each glyph is
//! scaled into the cell that estimate gives it.

use font8x8::legacy::BASIC_LEGACY;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendTextStyle, DrawingBackend, DrawingErrorKind,
};

/// A backend drawing on `w`×`h` RGB pixels, rows top to bottom (borrowed, so that the pixels
/// outlive the drawing area that owns the backend).
pub struct Canvas<'a> {
    w: u32,
    h: u32,
    px: &'a mut [u8],
}

/// The canvas itself cannot fail; plotters' backend trait wants an error type.
#[derive(Debug, thiserror::Error)]
#[error("raster canvas")]
pub struct CanvasError;

/// `w`×`h` black RGB pixels.
pub fn pixels(w: u32, h: u32) -> Vec<u8> {
    vec![0; w as usize * h as usize * 3]
}

/// `w`×`h` RGB pixels as a PNG (8-bit RGB).
pub fn png(w: u32, h: u32, px: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header()?;
    wr.write_image_data(px)?;
    wr.finish()?;
    Ok(out)
}

impl<'a> Canvas<'a> {
    /// `px` holds `w`×`h` RGB pixels ([`pixels`]).
    pub fn new(w: u32, h: u32, px: &'a mut [u8]) -> Canvas<'a> {
        assert_eq!(px.len(), w as usize * h as usize * 3, "canvas of {w}x{h}");
        Canvas { w, h, px }
    }

    fn blend(&mut self, (x, y): BackendCoord, c: BackendColor) {
        if x < 0 || y < 0 || x >= self.w as i32 || y >= self.h as i32 || c.alpha <= 0.0 {
            return;
        }
        let i = (y as usize * self.w as usize + x as usize) * 3;
        let a = c.alpha.min(1.0);
        for (d, s) in self.px[i..i + 3]
            .iter_mut()
            .zip([c.rgb.0, c.rgb.1, c.rgb.2])
        {
            *d = (f64::from(s) * a + f64::from(*d) * (1.0 - a)).round() as u8;
        }
    }
}

impl DrawingBackend for Canvas<'_> {
    type ErrorType = CanvasError;

    fn get_size(&self) -> (u32, u32) {
        (self.w, self.h)
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<CanvasError>> {
        Ok(())
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<CanvasError>> {
        Ok(())
    }

    fn draw_pixel(
        &mut self,
        p: BackendCoord,
        c: BackendColor,
    ) -> Result<(), DrawingErrorKind<CanvasError>> {
        self.blend(p, c);
        Ok(())
    }

    /// The text in the box plotters' layout gives it (anchored and rotated as plotters' default
    /// text drawing does), one glyph centred in each character's cell, bottom-aligned;
    /// characters outside ASCII are drawn as `?`.
    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<CanvasError>> {
        let color = style.color();
        let n = text.chars().count();
        if color.alpha == 0.0 || n == 0 {
            return Ok(());
        }
        let ((x0, y0), (x1, y1)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (x1 - x0, y1 - y0);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let trans = style.transform();
        let cell_w = f64::from(width) / n as f64;
        // Whole-pixel scaling keeps the bitmap glyphs crisp; their 7 inked columns fit a cell
        // from 7 pixels (a 16 px font in plotters' estimate) on.
        let scale = ((cell_w / 7.0).floor() as i32).max(1);
        let top = height - 8 * scale;
        for (i, ch) in text.chars().enumerate() {
            let glyph = BASIC_LEGACY
                .get(ch as usize)
                .copied()
                .unwrap_or(BASIC_LEGACY[usize::from(b'?')]);
            let left = (i as f64 * cell_w + (cell_w - f64::from(7 * scale)) / 2.0).round() as i32;
            for (gy, row) in glyph.iter().enumerate() {
                for gx in 0..8 {
                    // font8x8: bit 0 is the leftmost pixel of a row.
                    if row & (1 << gx) == 0 {
                        continue;
                    }
                    for sy in 0..scale {
                        for sx in 0..scale {
                            let lx = left + gx * scale + sx;
                            let ly = top + gy as i32 * scale + sy;
                            let (x, y) = trans.transform(lx + dx, ly + dy);
                            self.blend((pos.0 + x, pos.1 + y), color);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
