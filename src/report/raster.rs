//! Small 8-bit rasters for the report's pictures: the model's planar
//! `[C, H, W]` floats turned into grey or RGB pixels, the mask heat map,
//! the pattern (white or transparent outside its positions), strips and
//! grids with thin separators, nearest-neighbour upscaling, PNG encoding.
//! Everything here is pure (no files), so it is easy to test.

use image::{ExtendedColorType, ImageEncoder};

use crate::error::{Error, Result};

/// Smallest edge, in pixels, an image is shown at: 28×28 and 32×32 inputs
/// are too small to see, so they are blown up by an integer factor.
pub const DISPLAY_MIN: usize = 112;

/// Width of the separators between tiles of a strip or grid.
pub const SEPARATOR: usize = 2;

/// Grey level of the separators: light enough to be quiet on a white page,
/// dark enough to frame a pattern tile that is white outside its pixels.
pub const SEPARATOR_GREY: u8 = 200;

/// Grey level of a tile whose image is not available (an example stored
/// before its pixels were kept).
pub const MISSING_GREY: u8 = 235;

/// An 8-bit image, interleaved, row-major: 1 channel (grey), 2 (grey +
/// alpha), 3 (RGB) or 4 (RGBA).
#[derive(Clone, Debug, PartialEq)]
pub struct Raster {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Channels per pixel (1, 2, 3 or 4).
    pub channels: usize,
    /// `height * width * channels` bytes.
    pub data: Vec<u8>,
}

impl Raster {
    /// A raster filled with one pixel value (`fill.len()` is the channel count).
    pub fn filled(width: usize, height: usize, fill: &[u8]) -> Raster {
        Raster {
            width,
            height,
            channels: fill.len(),
            data: fill.repeat(width * height),
        }
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> &[u8] {
        let i = (y * self.width + x) * self.channels;
        &self.data[i..i + self.channels]
    }

    /// Sets the pixel at column `x`, row `y`.
    fn set(&mut self, x: usize, y: usize, px: &[u8]) {
        let i = (y * self.width + x) * self.channels;
        self.data[i..i + self.channels].copy_from_slice(px);
    }

    /// The same image in RGB (grey repeated; alpha dropped), so grey and
    /// colour tiles can share one grid.
    pub fn to_rgb(&self) -> Raster {
        let data = match self.channels {
            1 | 2 => self
                .data
                .chunks(self.channels)
                .flat_map(|p| [p[0], p[0], p[0]])
                .collect(),
            3 => self.data.clone(),
            _ => self
                .data
                .chunks(self.channels)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
        };
        Raster {
            width: self.width,
            height: self.height,
            channels: 3,
            data,
        }
    }

    /// Nearest-neighbour resize to `width × height` (exact integer blow-up
    /// when the sizes are multiples, so no pixel is invented or blurred).
    pub fn resize_nearest(&self, width: usize, height: usize) -> Raster {
        if width == self.width && height == self.height {
            return self.clone();
        }
        let c = self.channels;
        let mut data = Vec::with_capacity(width * height * c);
        for y in 0..height {
            let sy = y * self.height / height;
            for x in 0..width {
                let sx = x * self.width / width;
                let i = (sy * self.width + sx) * c;
                data.extend_from_slice(&self.data[i..i + c]);
            }
        }
        Raster {
            width,
            height,
            channels: c,
            data,
        }
    }

    /// Blows the image up by an integer factor (nearest neighbour).
    pub fn upscale(&self, factor: usize) -> Raster {
        self.resize_nearest(self.width * factor, self.height * factor)
    }

    /// Copies `src` (same channel count) with its top-left corner at `(x, y)`.
    fn blit(&mut self, src: &Raster, x: usize, y: usize) {
        debug_assert_eq!(src.channels, self.channels);
        let c = self.channels;
        for row in 0..src.height {
            let d = ((y + row) * self.width + x) * c;
            let s = row * src.width * c;
            self.data[d..d + src.width * c].copy_from_slice(&src.data[s..s + src.width * c]);
        }
    }

    /// PNG bytes (grey, grey+alpha, RGB or RGBA, 8 bits per channel).
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let colour = match self.channels {
            1 => ExtendedColorType::L8,
            2 => ExtendedColorType::La8,
            3 => ExtendedColorType::Rgb8,
            4 => ExtendedColorType::Rgba8,
            n => {
                return Err(Error::Msg(format!(
                    "report: cannot encode {n} channels as PNG"
                )))
            }
        };
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(&self.data, self.width as u32, self.height as u32, colour)
            .map_err(|e| Error::Msg(format!("report: PNG encoding failed: {e}")))?;
        Ok(out)
    }
}

/// The integer factor that shows an `h × w` image at about [`DISPLAY_MIN`]
/// pixels or more (1 for images already that large).
pub fn display_scale(h: usize, w: usize) -> usize {
    DISPLAY_MIN.div_ceil(h.max(w).max(1)).max(1)
}

/// A value in [0, 1] as a byte (clamped; NaN becomes 0).
pub fn to_byte(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

/// The byte pixel at flat position `p` of a planar `[C, H, W]` image:
/// 1 value for grey, 3 for RGB. Images with another channel count are shown
/// in grey (the channel mean), the only faithful single picture of them.
fn planar_pixel(pixels: &[f32], c: usize, plane: usize, p: usize) -> Vec<u8> {
    match c {
        1 => vec![to_byte(pixels[p])],
        3 => (0..3).map(|ch| to_byte(pixels[ch * plane + p])).collect(),
        _ => {
            let mean = (0..c).map(|ch| pixels[ch * plane + p]).sum::<f32>() / c as f32;
            vec![to_byte(mean)]
        }
    }
}

/// Channels of the picture of a `C`-channel image (RGB for 3, grey otherwise).
fn picture_channels(c: usize) -> usize {
    if c == 3 {
        3
    } else {
        1
    }
}

fn check_len(what: &str, got: usize, [c, h, w]: [usize; 3]) -> Result<()> {
    if got == c * h * w {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "report: {what} has {got} values, expected {c}×{h}×{w} = {}",
            c * h * w
        )))
    }
}

/// A planar `[C, H, W]` image in [0, 1] as a raster at its own size: grey
/// for C = 1, RGB for C = 3.
pub fn from_planar(pixels: &[f32], shape: [usize; 3]) -> Result<Raster> {
    check_len("an image", pixels.len(), shape)?;
    let [c, h, w] = shape;
    let plane = h * w;
    let pc = picture_channels(c);
    let mut data = Vec::with_capacity(plane * pc);
    for p in 0..plane {
        data.extend(planar_pixel(pixels, c, plane, p));
    }
    Ok(Raster {
        width: w,
        height: h,
        channels: pc,
        data,
    })
}

/// The pattern as the authors draw it: the canvas's pixels at `positions`,
/// and elsewhere white (`transparent == false`, grey or RGB) or fully
/// transparent (`transparent == true`, grey+alpha or RGBA, colour 0).
pub fn pattern(
    canvas: &[f32],
    positions: &[usize],
    shape: [usize; 3],
    transparent: bool,
) -> Result<Raster> {
    check_len("the canvas", canvas.len(), shape)?;
    let [c, h, w] = shape;
    let plane = h * w;
    if let Some(&p) = positions.iter().find(|&&p| p >= plane) {
        return Err(Error::Msg(format!(
            "report: pattern position {p} is outside the {h}×{w} image"
        )));
    }
    let pc = picture_channels(c);
    let mut out = if transparent {
        Raster::filled(w, h, &vec![0; pc + 1])
    } else {
        Raster::filled(w, h, &vec![255; pc])
    };
    for &p in positions {
        let mut px = planar_pixel(canvas, c, plane, p);
        if transparent {
            px.push(255);
        }
        out.set(p % w, p / w, &px);
    }
    Ok(out)
}

/// The pattern for display: the canvas's pixels at `positions` over a
/// mid-grey checkerboard (blocks of 2 pixels), so that white and black
/// pattern pixels both stand out (a white canvas's pattern on white, as the
/// authors draw it, is invisible).
pub fn pattern_on_grey(canvas: &[f32], positions: &[usize], shape: [usize; 3]) -> Result<Raster> {
    let [c, h, w] = shape;
    let mut out = pattern(canvas, positions, shape, false)?;
    let pc = picture_channels(c);
    let kept: std::collections::HashSet<usize> = positions.iter().copied().collect();
    for p in (0..h * w).filter(|p| !kept.contains(p)) {
        let (x, y) = (p % w, p / w);
        let tone = if (x / 2 + y / 2) % 2 == 0 { 104 } else { 152 };
        out.set(x, y, &vec![tone; pc]);
    }
    Ok(out)
}

/// Viridis (matplotlib's perceptually uniform map) at nine evenly spaced
/// stops; its lightness rises monotonically, so a larger mask value always
/// looks brighter, also in grey print.
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [72, 40, 120],
    [62, 74, 137],
    [49, 104, 142],
    [38, 130, 142],
    [31, 158, 137],
    [53, 183, 121],
    [109, 205, 89],
    [253, 231, 37],
];

/// The viridis colour of a value in [0, 1] (clamped), linearly
/// interpolated between the stops.
pub fn viridis(v: f32) -> [u8; 3] {
    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) } as f64;
    let t = v * (VIRIDIS.len() - 1) as f64;
    let i = (t.floor() as usize).min(VIRIDIS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    [0, 1, 2].map(|ch| (a[ch] as f64 + f * (b[ch] as f64 - a[ch] as f64)).round() as u8)
}

/// Heat map of a mask `[H, W]` on the absolute scale 0 → 1 (not stretched
/// per mask, so masks of different classes compare at a glance).
pub fn heat_map(mask: &[f32], h: usize, w: usize) -> Result<Raster> {
    check_len("the mask", mask.len(), [1, h, w])?;
    Ok(Raster {
        width: w,
        height: h,
        channels: 3,
        data: mask.iter().flat_map(|&m| viridis(m)).collect(),
    })
}

/// Tiles side by side, framed and separated by [`SEPARATOR`]-wide lines.
/// All tiles must share height and channel count.
pub fn strip(tiles: &[Raster]) -> Raster {
    grid(&[tiles.to_vec()])
}

/// Rows of tiles, framed and separated by thin lines. Every tile is
/// converted to the widest channel layout among them (grey rows next to a
/// colour heat map become RGB); rows are as tall as their tallest tile and
/// columns as wide as their widest, smaller tiles sit top-left.
pub fn grid(rows: &[Vec<Raster>]) -> Raster {
    let channels = rows.iter().flatten().map(|t| t.channels).max().unwrap_or(1);
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let col_w: Vec<usize> = (0..cols)
        .map(|j| {
            rows.iter()
                .filter_map(|r| r.get(j))
                .map(|t| t.width)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let row_h: Vec<usize> = rows
        .iter()
        .map(|r| r.iter().map(|t| t.height).max().unwrap_or(0))
        .collect();
    let width = col_w.iter().sum::<usize>() + SEPARATOR * (cols + 1);
    let height = row_h.iter().sum::<usize>() + SEPARATOR * (rows.len() + 1);
    let sep = match channels {
        2 => vec![SEPARATOR_GREY, 255],
        4 => vec![SEPARATOR_GREY, SEPARATOR_GREY, SEPARATOR_GREY, 255],
        n => vec![SEPARATOR_GREY; n],
    };
    let mut out = Raster::filled(width, height, &sep);
    let mut y = SEPARATOR;
    for (r, row) in rows.iter().enumerate() {
        let mut x = SEPARATOR;
        for (j, tile) in row.iter().enumerate() {
            let t = convert(tile, channels);
            out.blit(&t, x, y);
            x += col_w[j] + SEPARATOR;
        }
        y += row_h[r] + SEPARATOR;
    }
    out
}

/// `tile` in `channels` channels (only ever widening: grey → RGB, adding
/// an opaque alpha where the tile has none).
fn convert(tile: &Raster, channels: usize) -> Raster {
    let widen = |p: &[u8]| -> Vec<u8> {
        match (p.len(), channels) {
            (1, 2) => vec![p[0], 255],
            (1, 3) | (2, 3) => vec![p[0]; 3],
            (1, 4) => vec![p[0], p[0], p[0], 255],
            (2, 4) => vec![p[0], p[0], p[0], p[1]],
            (3, 4) => vec![p[0], p[1], p[2], 255],
            _ => p.to_vec(),
        }
    };
    if tile.channels >= channels {
        return tile.clone();
    }
    Raster {
        width: tile.width,
        height: tile.height,
        channels,
        data: tile.data.chunks(tile.channels).flat_map(widen).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn luminance(c: [u8; 3]) -> f64 {
        0.2126 * c[0] as f64 + 0.7152 * c[1] as f64 + 0.0722 * c[2] as f64
    }

    #[test]
    fn viridis_gets_brighter_with_the_value() {
        let mut last = -1.0;
        for i in 0..=1000 {
            let l = luminance(viridis(i as f32 / 1000.0));
            assert!(l >= last - 0.5, "luminance drops at {i}: {l} < {last}");
            last = last.max(l);
        }
        for i in 0..20 {
            let (a, b) = (i as f32 / 20.0, (i + 1) as f32 / 20.0);
            assert!(luminance(viridis(b)) > luminance(viridis(a)) + 5.0);
        }
        assert_eq!(viridis(0.0), VIRIDIS[0]);
        assert_eq!(viridis(1.0), VIRIDIS[8]);
        assert_eq!(viridis(f32::NAN), VIRIDIS[0]);
        assert_eq!(viridis(7.0), VIRIDIS[8]);
    }

    #[test]
    fn display_scale_reaches_the_minimum() {
        assert_eq!(display_scale(28, 28), 4);
        assert_eq!(display_scale(32, 32), 4);
        assert_eq!(display_scale(224, 224), 1);
        assert_eq!(display_scale(64, 100), 2);
    }

    #[test]
    fn upscaling_repeats_each_pixel_in_a_block() {
        let r = Raster {
            width: 2,
            height: 1,
            channels: 1,
            data: vec![10, 20],
        };
        let u = r.upscale(3);
        assert_eq!((u.width, u.height), (6, 3));
        assert_eq!(&u.data[..6], &[10, 10, 10, 20, 20, 20]);
        assert_eq!(u.data[12..], u.data[..6]);
    }

    #[test]
    fn grid_frames_and_widens_channels() {
        let grey = Raster::filled(3, 2, &[0]);
        let red = Raster::filled(3, 2, &[255, 0, 0]);
        let g = grid(&[vec![grey.clone(), red], vec![grey]]);
        assert_eq!(g.channels, 3);
        assert_eq!(g.width, 3 + 3 + 3 * SEPARATOR);
        assert_eq!(g.height, 2 + 2 + 3 * SEPARATOR);
        assert_eq!(g.pixel(0, 0), &[SEPARATOR_GREY; 3]);
        assert_eq!(g.pixel(SEPARATOR, SEPARATOR), &[0, 0, 0]);
        assert_eq!(g.pixel(2 * SEPARATOR + 3, SEPARATOR), &[255, 0, 0]);
        // The second row has no second tile: separator grey there.
        assert_eq!(
            g.pixel(2 * SEPARATOR + 3, 2 * SEPARATOR + 2),
            &[SEPARATOR_GREY; 3]
        );
    }

    #[test]
    fn planar_rgb_is_interleaved_and_other_channel_counts_are_grey() {
        // 2 pixels, planes R = [1, 0], G = [0, 1], B = [0, 0].
        let r = from_planar(&[1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [3, 1, 2]).unwrap();
        assert_eq!(r.data, vec![255, 0, 0, 0, 255, 0]);
        let g = from_planar(&[1.0, 0.0], [2, 1, 1]).unwrap();
        assert_eq!(g.data, vec![128]);
        assert!(from_planar(&[0.0; 5], [3, 1, 2]).is_err());
    }

    #[test]
    fn a_white_pattern_shows_against_the_grey_background() {
        let canvas = vec![1.0; 16];
        let r = pattern_on_grey(&canvas, &[5, 10], [1, 4, 4]).unwrap();
        for p in 0..16 {
            let v = r.pixel(p % 4, p / 4)[0];
            if p == 5 || p == 10 {
                assert_eq!(v, 255);
            } else {
                assert!(v == 104 || v == 152, "background {v} at {p}");
            }
        }
    }

    #[test]
    fn pattern_positions_outside_the_image_are_refused() {
        assert!(pattern(&[0.0; 4], &[4], [1, 2, 2], false).is_err());
    }
}
