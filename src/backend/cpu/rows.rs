//! What lets a search step run without the host: gathering a batch by row
//! index from the images kept on the backend, writing a step's results into
//! its row of a window buffer, and counting non-finite values, each at the
//! step a cursor holds.
//! GPU twin: kernels/rows.cu.

use crate::backend::check::{counts_width, gather_source, row_count};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The step a cursor holds.
fn at(cursor: &[u32]) -> Result<usize> {
    cursor
        .first()
        .map(|&c| c as usize)
        .ok_or_else(|| Error::tensor("step cursor", "is empty"))
}

/// Rows `index[c*n..(c+1)*n]` of `src` (rows along its first axis), `c`
/// the cursor's step.
pub(super) fn gather(src: &Tensor, index: &[u32], cursor: &[u32], n: usize) -> Result<Tensor> {
    let (rows, row_len) = gather_source(src.shape())?;
    let start = at(cursor)? * n;
    let picked = index.get(start..start + n).ok_or_else(|| {
        Error::tensor(
            "gather index",
            format!(
                "entries {start}..{} asked of {} indices",
                start + n,
                index.len()
            ),
        )
    })?;
    let mut out = Vec::with_capacity(n * row_len);
    for &r in picked {
        let r = r as usize;
        if r >= rows {
            return Err(Error::tensor(
                "gather index",
                format!("row {r} of a source with {rows} rows"),
            ));
        }
        out.extend_from_slice(&src.data()[r * row_len..(r + 1) * row_len]);
    }
    let mut shape = src.shape().to_vec();
    shape[0] = n;
    Tensor::new(&shape, out)
}

/// `dst[c] = src`, `c` the cursor's step.
pub(super) fn write_row(dst: &mut Tensor, cursor: &[u32], src: &Tensor) -> Result<()> {
    let rows = row_count(dst.shape(), src.len())?;
    let c = at(cursor)?;
    if c >= rows {
        return Err(Error::tensor(
            "window row",
            format!("step {c} of a window of {rows}"),
        ));
    }
    dst.data_mut()[c * src.len()..(c + 1) * src.len()].copy_from_slice(src.data());
    Ok(())
}

/// Adds the number of NaN or infinite values of `x` to `counts[c][slot]`
/// (`counts [rows, width]`), `c` the cursor's step.
pub(super) fn count_nonfinite(
    x: &Tensor,
    counts: &mut Tensor,
    cursor: &[u32],
    slot: usize,
) -> Result<()> {
    let width = counts_width(counts.shape(), slot)?;
    let c = at(cursor)?;
    let bad = x.data().iter().filter(|v| !v.is_finite()).count();
    let len = counts.len();
    let entry = counts.data_mut().get_mut(c * width + slot).ok_or_else(|| {
        Error::tensor(
            "non-finite counts",
            format!("step {c} of {} rows", len / width),
        )
    })?;
    // The GPU twin adds an i32 count converted to f32; so does this.
    *entry += bad as i32 as f32;
    Ok(())
}

/// Moves the cursor to the next step.
pub(super) fn next(cursor: &mut [u32]) -> Result<()> {
    let c = cursor
        .first_mut()
        .ok_or_else(|| Error::tensor("step cursor", "is empty"))?;
    *c += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gather_takes_the_indexed_rows_of_the_cursors_step() {
        let src = Tensor::from_fn(&[4, 2, 1, 1], |i| i as f32);
        let index = [0, 1, 3, 3, 0, 2];
        let out = gather(&src, &index, &[1], 2).unwrap();
        assert_eq!(out.shape(), &[2, 2, 1, 1]);
        assert_eq!(out.data(), &[6.0, 7.0, 6.0, 7.0]);
        let e = gather(&src, &[9, 3], &[0], 1).unwrap_err().to_string();
        assert!(e.contains("row 9") && e.contains("4 rows"), "{e}");
        assert!(gather(&src, &index, &[3], 2).is_err(), "past the index");
    }

    #[test]
    fn counts_add_up_nan_and_infinities_only_in_the_cursors_row() {
        let x = Tensor::new(
            &[5],
            vec![1.0, f32::NAN, f32::INFINITY, -f32::INFINITY, f32::MAX],
        )
        .unwrap();
        let mut counts = Tensor::full(&[2, 2], 1.0);
        count_nonfinite(&x, &mut counts, &[1], 1).unwrap();
        assert_eq!(counts.data(), &[1.0, 1.0, 1.0, 4.0]);
        assert!(count_nonfinite(&x, &mut counts, &[1], 2).is_err(), "slot");
        assert!(count_nonfinite(&x, &mut counts, &[2], 0).is_err(), "row");
    }

    #[test]
    fn a_write_lands_in_the_cursors_row_and_never_overruns() {
        let mut dst = Tensor::zeros(&[3, 2]);
        let mut cursor = [0u32];
        next(&mut cursor).unwrap();
        write_row(&mut dst, &cursor, &Tensor::full(&[2], 7.0)).unwrap();
        assert_eq!(dst.data(), &[0.0, 0.0, 7.0, 7.0, 0.0, 0.0]);
        assert!(write_row(&mut dst, &[3], &Tensor::full(&[2], 1.0)).is_err());
        assert!(write_row(&mut dst, &[0], &Tensor::full(&[3], 1.0)).is_err());
    }
}
