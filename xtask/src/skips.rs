//! The end of `cargo xtask test`: every test that did not run here, and why — the skips the
//! privileged tests recorded at run time (`berth_tests::skip`, through `BERTH_SKIP_LOG`) and
//! the `#[ignore = "reason"]` tests, found in the sources.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One test (or check) that did not run.
#[derive(Debug, PartialEq, Eq)]
pub struct Skipped {
    pub what: String,
    pub why: String,
}

/// Where the privileged tests append their skips for this run.
pub fn log_path() -> PathBuf {
    std::env::temp_dir().join(format!("berth-skips-{}.tsv", std::process::id()))
}

/// Skips recorded at run time (`what\twhy` lines).
pub fn recorded(log: &Path) -> Result<Vec<Skipped>> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", log.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(what, why)| Skipped {
            what: what.to_owned(),
            why: why.to_owned(),
        })
        .collect())
}

/// `#[ignore = "reason"]` tests in the Rust sources under `dirs`.
pub fn ignored(dirs: &[PathBuf]) -> Result<Vec<Skipped>> {
    let mut out = Vec::new();
    let mut files = Vec::new();
    for d in dirs {
        collect_rs(d, &mut files)?;
    }
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?;
        out.extend(ignored_in(&text));
    }
    Ok(out)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect_rs(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The ignored tests of one file: the reason of each `#[ignore...]` and the name of the `fn`
/// that follows it.
fn ignored_in(text: &str) -> Vec<Skipped> {
    let mut out = Vec::new();
    let mut pending: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("#[ignore") {
            let why = rest
                .split_once('"')
                .and_then(|(_, r)| r.rsplit_once('"'))
                .map(|(r, _)| r.to_owned())
                .unwrap_or_else(|| "no reason given".to_owned());
            pending = Some(why);
        } else if let Some(why) = &pending
            && let Some(name) = fn_name(line)
        {
            out.push(Skipped {
                what: name.to_owned(),
                why: why.clone(),
            });
            pending = None;
        }
    }
    out
}

fn fn_name(line: &str) -> Option<&str> {
    let l = line.strip_prefix("pub ").unwrap_or(line);
    let l = l.strip_prefix("async ").unwrap_or(l);
    l.strip_prefix("fn ")?.split(['(', '<']).next()
}

/// The closing list, one line per skip.
pub fn report(skips: &[Skipped]) -> String {
    if skips.is_empty() {
        return "skipped tests: none\n".to_owned();
    }
    let mut s = format!("skipped tests ({}):\n", skips.len());
    for k in skips {
        s.push_str(&format!("  {}: {}\n", k.what, k.why));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ignored_tests_and_their_reasons() {
        let src = r#"
#[test]
#[ignore = "needs a Debian mirror"]
fn builds_debian() {}

#[test]
fn runs() {}

    #[test]
    #[ignore]
    pub fn bare() {}
"#;
        assert_eq!(
            ignored_in(src),
            vec![
                Skipped {
                    what: "builds_debian".into(),
                    why: "needs a Debian mirror".into()
                },
                Skipped {
                    what: "bare".into(),
                    why: "no reason given".into()
                },
            ]
        );
    }

    #[test]
    fn reads_recorded_skips() {
        let dir = std::env::temp_dir().join(format!("xtask-skips-test-{}", std::process::id()));
        std::fs::write(&dir, "a\tno quota\nbroken line\nb\tno vlan\n").unwrap();
        let got = recorded(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].what, "b");
        assert!(
            recorded(Path::new("/nonexistent/skips"))
                .unwrap()
                .is_empty()
        );
        assert!(report(&got).starts_with("skipped tests (2):\n  a: no quota\n"));
    }
}
