//! What lets a search step run without the host: gathering a batch by row
//! index from the images kept on the backend, writing a step's results into
//! a window buffer, and counting non-finite values.
//! GPU twin: kernels/rows.cu.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Rows `index[start..start+n]` of `src` (rows along its first axis).
pub(super) fn gather(src: &Tensor, index: &[u32], start: usize, n: usize) -> Result<Tensor> {
    let rows = *src
        .shape()
        .first()
        .ok_or_else(|| Error::tensor("gather source", "has no rows (a scalar)"))?;
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
    let row_len = src.len() / rows.max(1);
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

/// Writes `src`'s values into `dst` from flat element `at` on.
pub(super) fn write_at(dst: &mut Tensor, at: usize, src: &Tensor) -> Result<()> {
    let end = at + src.len();
    if end > dst.len() {
        return Err(Error::tensor(
            "write_at destination",
            format!(
                "{} values written at {at} overrun its {} values",
                src.len(),
                dst.len()
            ),
        ));
    }
    dst.data_mut()[at..end].copy_from_slice(src.data());
    Ok(())
}

/// Adds the number of NaN or infinite values of `x` to `counts[slot]`.
pub(super) fn count_nonfinite(x: &Tensor, counts: &mut Tensor, slot: usize) -> Result<()> {
    let bad = x.data().iter().filter(|v| !v.is_finite()).count();
    let len = counts.len();
    let c = counts.data_mut().get_mut(slot).ok_or_else(|| {
        Error::tensor("non-finite counts", format!("slot {slot} of {len} counts"))
    })?;
    // The GPU twin adds an i32 count converted to f32; so does this.
    *c += bad as i32 as f32;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gather_takes_the_indexed_rows_in_index_order() {
        let src = Tensor::from_fn(&[4, 2, 1, 1], |i| i as f32);
        let out = gather(&src, &[9, 3, 0, 3], 1, 3).unwrap();
        assert_eq!(out.shape(), &[3, 2, 1, 1]);
        assert_eq!(out.data(), &[6.0, 7.0, 0.0, 1.0, 6.0, 7.0]);
        let e = gather(&src, &[9, 3], 0, 1).unwrap_err().to_string();
        assert!(e.contains("row 9") && e.contains("4 rows"), "{e}");
        assert!(gather(&src, &[1, 2], 1, 2).is_err());
    }

    #[test]
    fn counts_add_up_nan_and_infinities_only() {
        let x = Tensor::new(
            &[5],
            vec![1.0, f32::NAN, f32::INFINITY, -f32::INFINITY, f32::MAX],
        )
        .unwrap();
        let mut counts = Tensor::full(&[2], 1.0);
        count_nonfinite(&x, &mut counts, 1).unwrap();
        assert_eq!(counts.data(), &[1.0, 4.0]);
        assert!(count_nonfinite(&x, &mut counts, 2).is_err());
    }

    #[test]
    fn a_write_lands_at_its_offset_and_never_overruns() {
        let mut dst = Tensor::zeros(&[5]);
        write_at(&mut dst, 2, &Tensor::full(&[3], 7.0)).unwrap();
        assert_eq!(dst.data(), &[0.0, 0.0, 7.0, 7.0, 7.0]);
        assert!(write_at(&mut dst, 3, &Tensor::full(&[3], 1.0)).is_err());
    }
}
