//! Check results: JSON (the CLI's `--json`, the supervisor's answers) and JUnit XML.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::exit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub kind: String,
    pub status: Status,
    pub expected: String,
    pub actual: String,
    pub attempts: u32,
    pub duration_ms: u64,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub run_id: String,
    pub topology: String,
    pub topology_hash: String,
    pub kernel: String,
    pub berth_version: String,
    pub checks: Vec<CheckResult>,
}

impl Results {
    /// 1 when a check failed, else 4 when one was skipped (a skip never passes), else 0.
    pub fn exit_code(&self) -> u8 {
        if self.checks.iter().any(|c| c.status == Status::Fail) {
            exit::CHECK_FAILED
        } else if self.checks.iter().any(|c| c.status == Status::Skipped) {
            exit::SKIPPED
        } else {
            exit::PASS
        }
    }

    pub fn count(&self, s: Status) -> usize {
        self.checks.iter().filter(|c| c.status == s).count()
    }

    /// One JUnit `<testsuite>`: a check is a `<testcase>`, failures carry expected vs actual.
    pub fn junit(&self) -> String {
        let total_ms: u64 = self.checks.iter().map(|c| c.duration_ms).sum();
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            x,
            "<testsuite name=\"berth-testbed {}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" errors=\"0\" time=\"{:.3}\">",
            esc(&self.topology),
            self.checks.len(),
            self.count(Status::Fail),
            self.count(Status::Skipped),
            total_ms as f64 / 1000.0
        );
        x.push_str("  <properties>\n");
        for (k, v) in [
            ("run_id", &self.run_id),
            ("topology_hash", &self.topology_hash),
            ("kernel", &self.kernel),
            ("berth_version", &self.berth_version),
        ] {
            let _ = writeln!(x, "    <property name=\"{k}\" value=\"{}\"/>", esc(v));
        }
        x.push_str("  </properties>\n");
        for c in &self.checks {
            let _ = write!(
                x,
                "  <testcase classname=\"testbed.{}\" name=\"{}\" time=\"{:.3}\"",
                esc(&c.kind),
                esc(&c.name),
                c.duration_ms as f64 / 1000.0
            );
            let why = c.reason.as_deref().unwrap_or("");
            match c.status {
                Status::Pass => x.push_str("/>\n"),
                Status::Skipped => {
                    let _ = writeln!(
                        x,
                        ">\n    <skipped message=\"{}\"/>\n  </testcase>",
                        esc(why)
                    );
                }
                Status::Fail => {
                    let _ = writeln!(
                        x,
                        ">\n    <failure message=\"{}\">expected: {}\nactual: {}\nattempts: {}</failure>\n  </testcase>",
                        esc(why),
                        esc(&c.expected),
                        esc(&c.actual),
                        c.attempts
                    );
                }
            }
        }
        x.push_str("</testsuite>\n");
        x
    }

    /// The human table: one line per check, expected vs actual.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            let st = match c.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
                Status::Skipped => "skip",
            };
            let _ = writeln!(
                s,
                "{st:4}  {:32} expected {:24} actual {:24} ({} attempt(s), {} ms){}",
                c.name,
                c.expected,
                c.actual,
                c.attempts,
                c.duration_ms,
                c.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            s,
            "{} passed, {} failed, {} skipped (run {})",
            self.count(Status::Pass),
            self.count(Status::Fail),
            self.count(Status::Skipped),
            self.run_id
        );
        s
    }
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // XML 1.0 has no escape for most control characters: drop them.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\t' | '\r') => {}
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(status: Status) -> CheckResult {
        CheckResult {
            name: "n<&>\"".into(),
            kind: "ping".into(),
            status,
            expected: "reach".into(),
            actual: "no \u{1} reach".into(),
            attempts: 3,
            duration_ms: 1500,
            reason: Some("why".into()),
        }
    }

    #[test]
    fn exit_codes_and_escaping() {
        let mut r = Results {
            run_id: "abc".into(),
            topology: "t.toml".into(),
            topology_hash: "00".into(),
            kernel: "6.18".into(),
            berth_version: "0.1.0".into(),
            checks: vec![res(Status::Pass)],
        };
        assert_eq!(r.exit_code(), 0);
        r.checks.push(res(Status::Skipped));
        assert_eq!(r.exit_code(), 4);
        r.checks.push(res(Status::Fail));
        assert_eq!(r.exit_code(), 1);
        let x = r.junit();
        assert!(x.contains("name=\"n&lt;&amp;&gt;&quot;\""), "{x}");
        assert!(!x.contains('\u{1}'));
        assert!(x.contains("failures=\"1\" skipped=\"1\""));
    }
}
