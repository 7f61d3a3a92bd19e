//! Ground truth for a scan (`--labels FILE.csv`): which models carry a
//! backdoor, and towards which class.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What is known about one model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// Whether the model carries a backdoor.
    pub backdoored: bool,
    /// Its target class (backdoored models only).
    pub target: Option<usize>,
}

/// The rows of a labels file, in file order.
#[derive(Clone, Debug, Default)]
pub struct Labels {
    rows: Vec<(String, Label)>,
    /// The folder of the labels file: relative model paths in it are read
    /// from there as well as from the working folder.
    base: PathBuf,
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "backdoored" => Some(true),
        "0" | "false" | "no" | "clean" => Some(false),
        _ => None,
    }
}

impl Labels {
    /// Reads `model,backdoored,target` rows (a header row of those names is
    /// required, so that a file of another layout is refused, not misread).
    /// `backdoored` is 1/0, true/false or yes/no; `target` is a class index,
    /// empty for clean models.
    pub fn read(path: &Path) -> Result<Labels> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Labels::parse(&text, path)
    }

    /// Parses the text of a labels file (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Labels> {
        let bad = |line: usize, msg: String| Error::Format {
            path: path.to_path_buf(),
            msg: format!("line {line}: {msg}"),
        };
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
        let Some((n, header)) = lines.next() else {
            return Err(bad(
                1,
                "empty; expected the header `model,backdoored,target`".into(),
            ));
        };
        let cols: Vec<String> = header
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        if cols != ["model", "backdoored", "target"] {
            return Err(bad(
                n,
                format!("header `{header}`: expected `model,backdoored,target`"),
            ));
        }
        let mut rows: Vec<(String, Label)> = Vec::new();
        for (n, line) in lines {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != 3 {
                return Err(bad(
                    n,
                    format!("`{line}`: expected 3 fields, got {}", f.len()),
                ));
            }
            let backdoored = parse_bool(f[1]).ok_or_else(|| {
                bad(
                    n,
                    format!("backdoored `{}` is not 1/0, true/false or yes/no", f[1]),
                )
            })?;
            let target = match (f[2], backdoored) {
                ("", false) => None,
                ("", true) => {
                    return Err(bad(
                        n,
                        format!("`{}` is backdoored but has no target", f[0]),
                    ))
                }
                (t, true) => Some(
                    t.parse::<usize>()
                        .map_err(|_| bad(n, format!("target `{t}` is not a class index")))?,
                ),
                (_, false) => return Err(bad(n, format!("`{}` is clean but has a target", f[0]))),
            };
            if f[0].is_empty() {
                return Err(bad(n, "empty model path".into()));
            }
            if rows.iter().any(|(m, _)| m == f[0]) {
                return Err(bad(n, format!("`{}` is listed twice", f[0])));
            }
            rows.push((f[0].to_string(), Label { backdoored, target }));
        }
        Ok(Labels {
            rows,
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        })
    }

    /// The label of a scanned model (its path as given): the row naming the
    /// same path, or the same file (relative to the working folder or to
    /// the labels file's folder), or else the only row with its file name.
    pub fn find(&self, model: &str) -> Option<&Label> {
        if let Some((_, l)) = self.rows.iter().find(|(m, _)| m == model) {
            return Some(l);
        }
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        if let Some(want) = canon(Path::new(model)) {
            let hit = self.rows.iter().find(|(m, _)| {
                let p = Path::new(m);
                canon(p) == Some(want.clone()) || canon(&self.base.join(p)) == Some(want.clone())
            });
            if let Some((_, l)) = hit {
                return Some(l);
            }
        }
        let name = Path::new(model).file_name()?;
        let mut same = self
            .rows
            .iter()
            .filter(|(m, _)| Path::new(m).file_name() == Some(name));
        match (same.next(), same.next()) {
            (Some((_, l)), None) => Some(l),
            _ => None,
        }
    }

    /// How many rows the file has.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the file has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Labels> {
        Labels::parse(text, Path::new("labels.csv"))
    }

    #[test]
    fn rows_give_backdoor_and_target_by_model_path_or_file_name() {
        let l = parse("model,backdoored,target\nm/a.safetensors,1,3\nm/b.onnx,no,\n").unwrap();
        assert_eq!(l.len(), 2);
        let a = Label {
            backdoored: true,
            target: Some(3),
        };
        assert_eq!(l.find("m/a.safetensors"), Some(&a));
        assert_eq!(l.find("elsewhere/a.safetensors"), Some(&a));
        assert_eq!(
            l.find("m/b.onnx"),
            Some(&Label {
                backdoored: false,
                target: None
            })
        );
        assert_eq!(l.find("m/c.onnx"), None);
    }

    #[test]
    fn a_file_name_shared_by_two_rows_matches_neither() {
        let l = parse("model,backdoored,target\nx/a.onnx,1,2\ny/a.onnx,0,\n").unwrap();
        assert_eq!(l.find("z/a.onnx"), None);
        assert!(l.find("x/a.onnx").is_some());
    }

    #[test]
    fn malformed_files_are_refused_with_the_line() {
        for (text, want) in [
            ("", "header"),
            ("path,label\n", "header"),
            ("model,backdoored,target\na,maybe,\n", "line 2"),
            ("model,backdoored,target\na,1,\n", "no target"),
            ("model,backdoored,target\na,0,4\n", "clean but has a target"),
            ("model,backdoored,target\na,1,x\n", "not a class index"),
            ("model,backdoored,target\na,1,2\na,1,2\n", "listed twice"),
            ("model,backdoored,target\na,1\n", "expected 3 fields"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains("labels.csv") && e.contains(want),
                "{text:?}: {e}"
            );
        }
    }
}
