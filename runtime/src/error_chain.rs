//! Printing an error together with its causes.
//!
//! berth's errors name the operation and the object in their own message and leave the cause to
//! [`Error::source`], so a bare `{e}` shows only the outermost level. Where an error ends up as
//! text rather than as an error value (a log field, a report of several failures, a
//! string-typed channel), [`ErrorChain`] keeps every cause; binaries get the same from anyhow's
//! `{:#}`.

use std::error::Error;
use std::fmt;

/// Displays an error and each of its sources, outermost first, joined by `": "`.
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Test check of the error-display rule: no level of `e`'s chain repeats the text of the level
/// below it (a message that embeds its `#[source]` would print that cause twice).
#[cfg(test)]
pub(crate) fn assert_causes_not_repeated(e: &(dyn Error + 'static)) {
    let mut outer = e;
    let mut levels = 1;
    while let Some(inner) = outer.source() {
        let (o, i) = (outer.to_string(), inner.to_string());
        assert!(
            !o.contains(&i),
            "level {levels} {o:?} repeats its cause {i:?} (chain: {})",
            ErrorChain(e)
        );
        outer = inner;
        levels += 1;
    }
    assert!(levels > 1, "{e} has no source: pick a variant that has one");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("read {path}")]
    struct Outer {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn prints_every_level_once() {
        let e = Outer {
            path: "/x",
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            ErrorChain(&e).to_string(),
            "read /x: No such file or directory (os error 2)"
        );
        assert_causes_not_repeated(&e);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("read {path}: {source}")]
    struct Repeats {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    #[should_panic(expected = "repeats its cause")]
    fn a_message_embedding_its_source_is_caught() {
        assert_causes_not_repeated(&Repeats {
            path: "/x",
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
    }
}
