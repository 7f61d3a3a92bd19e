//! Quantities typed on the command line: sizes in bytes and image counts.

use crate::error::{Error, Result};

/// A size in bytes: a number with an optional binary suffix K, M, G or T
/// (powers of 1024), optionally followed by `B` or `iB` (`2G`, `2GB`, `2GiB`).
/// `option` names the option in the error.
pub fn parse_bytes(s: &str, option: &str) -> Result<usize> {
    let t = s.trim().to_ascii_uppercase();
    let t = t
        .strip_suffix("IB")
        .filter(|r| r.ends_with(['K', 'M', 'G', 'T']))
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(&t);
    let (num, shift) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    // The float parser's own message ("invalid float literal") says nothing
    // about sizes, so it is replaced, not chained.
    let Ok(v) = num.trim().parse::<f64>() else {
        return Err(Error::arg(
            option,
            format!(
                "`{s}` is not a size: a number of bytes with an optional \
                 K, M, G or T suffix (e.g. 512M, 2G, 1T)"
            ),
        ));
    };
    let bytes = v * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(Error::arg(
            option,
            format!("`{s}` must be a positive size of at least one byte"),
        ));
    }
    Ok(bytes.min(usize::MAX as f64) as usize)
}

/// A count of images: a positive number, or `all` (None: no limit).
pub fn parse_count(s: &str, option: &str) -> Result<Option<usize>> {
    match s {
        "all" => Ok(None),
        n => match n.parse::<usize>() {
            Ok(v) if v > 0 => Ok(Some(v)),
            _ => Err(Error::arg(
                option,
                format!("`{n}` is not a positive number or `all`"),
            )),
        },
    }
}

/// A count as [`parse_count`] reads it back: the number, or `all` for None.
pub fn format_count(n: Option<usize>) -> String {
    n.map_or_else(|| "all".to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_every_binary_suffix() {
        let cases = [
            ("4096", 4096),
            ("512K", 512 << 10),
            ("512M", 512 << 20),
            ("2G", 2 << 30),
            ("1T", 1 << 40),
            ("1t", 1 << 40),
            ("2GB", 2 << 30),
            ("2GiB", 2 << 30),
            ("0.5G", 1 << 29),
            ("100B", 100),
        ];
        for (s, want) in cases {
            assert_eq!(parse_bytes(s, "--memory").unwrap(), want, "{s}");
        }
        for bad in [
            "1P", "", "G", "GiB", "0", "0.1", "-1G", "nan", "inf", "2GiBB",
        ] {
            let e = parse_bytes(bad, "--memory").unwrap_err().to_string();
            assert!(
                e.contains("--memory") && e.contains(&format!("`{bad}`")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_count_is_a_positive_number_or_all() {
        assert_eq!(parse_count("all", "--eval-per-class").unwrap(), None);
        assert_eq!(parse_count("30", "--eval-per-class").unwrap(), Some(30));
        for n in [None, Some(1), Some(200)] {
            assert_eq!(parse_count(&format_count(n), "--x").unwrap(), n);
        }
        for bad in ["0", "-1", "", "All", "1.5"] {
            let e = parse_count(bad, "--eval-per-class")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--eval-per-class") && e.contains(&format!("`{bad}`")),
                "{e}"
            );
        }
    }
}
