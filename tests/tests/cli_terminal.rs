//! What berth writes for people and for pipes: shell completions that parse, man pages that
//! render, colour only on a terminal without NO_COLOR, progress bars only on a terminal
//! without -q. A terminal is a real pty from util-linux `script`, so each check also sees the
//! opposite case (colour and bars do appear there) and cannot pass by printing nothing.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use berth_tests::ct::{TestHost, berth_bin};
use berth_tests::skip::skip;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether `s` holds an SGR (colour/attribute) escape: ESC [ digits/semicolons m.
fn has_sgr(s: &str) -> bool {
    s.match_indices("\x1b[").any(|(i, _)| {
        let rest = &s[i + 2..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == ';'))
            .unwrap_or(rest.len());
        rest[end..].starts_with('m')
    })
}

/// `cmd` (a shell command line) on a pty: stdout and stderr both go to the terminal, which
/// `script` copies to its stdout.
fn on_tty(cmd: &str, env: &[(&str, &str)]) -> String {
    let mut c = Command::new("script");
    c.args(["-qec", cmd, "/dev/null"])
        .stdin(Stdio::null())
        .env_remove("NO_COLOR")
        .env("TERM", "xterm")
        .env("COLUMNS", "120");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run script (util-linux)");
    assert!(o.status.success(), "script -c {cmd}: {o:?}");
    text(&o.stdout)
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn completion_scripts_parse() {
    let bin = berth_bin();
    for (shell, check) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        let o = Command::new(&bin)
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        let script = text(&o.stdout);
        assert!(script.contains("berth"), "{shell}: {script}");
        assert!(script.contains("ostemplate"), "{shell}: no create flags");
        if Command::new(check).arg("--version").output().is_err() {
            if shell == "bash" {
                panic!("bash missing");
            }
            skip(
                &format!("completion_scripts_parse/{shell}"),
                &format!("{check} is not installed"),
            );
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("completion");
        std::fs::write(&f, &script).unwrap();
        let o = Command::new(check).arg("-n").arg(&f).output().unwrap();
        assert!(o.status.success(), "{check} -n: {o:?}");
        if shell == "bash" {
            // Sourced for real, the completion function answers for a partial word.
            let o = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "source {f}; COMP_WORDS=(berth cre); COMP_CWORD=1; COMP_LINE='berth cre'; \
                     COMP_POINT=9; _berth berth cre berth; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                    f = sh_quote(&f)
                ))
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
            assert_eq!(text(&o.stdout).trim(), "create", "{o:?}");
        }
    }
    let o = Command::new(&bin)
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "an unknown shell is refused");
}

#[test]
fn every_man_page_renders() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(berth_bin())
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let mut pages: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    let names: Vec<String> = pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "berth.1",
        "berth-create.1",
        "berth-set.1",
        "berth-list.1",
        "berth-template-build-debian.1",
        "berth-completion.1",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    // Hidden commands get no page.
    assert!(
        !names
            .iter()
            .any(|n| n.contains("supervise") || n == "berth-man.1")
    );
    for p in &pages {
        let o: Output = Command::new("man")
            .arg("-l")
            .arg(p)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .expect("run man (man-db)");
        let page = text(&o.stdout);
        let err = text(&o.stderr);
        assert!(o.status.success(), "man -l {}: {err}", p.display());
        assert!(err.trim().is_empty(), "man -l {}: {err}", p.display());
        let cmd = p.file_stem().unwrap().to_string_lossy();
        assert!(
            page.contains("NAME") && page.contains(&*cmd),
            "{cmd}: {page}"
        );
        assert!(page.contains("SYNOPSIS"), "{cmd}: {page}");
        if cmd == "berth-create" {
            // The flags with their help, and the global ones.
            assert!(
                page.contains("--template") && page.contains("OS template"),
                "{page}"
            );
            assert!(page.contains("--root"), "{page}");
        }
    }
}

/// A rootfs tarball big enough that a bar is drawn before the import ends.
fn tarball(h: &TestHost, dir: &Path) -> std::path::PathBuf {
    let src = h.root.join("template/busybox/rootfs");
    let blob = dir.join("blob");
    // 16 MiB: a bar is drawn at the first byte; more would only fail on a nearly full disk.
    std::fs::write(&blob, vec![7u8; 16 << 20]).unwrap();
    let tar = dir.join("t.tar");
    let o = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .arg("-C")
        .arg(dir)
        .arg("blob")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    tar
}

#[test]
fn colour_and_progress_only_on_a_terminal() {
    let h = TestHost::new();
    let dir = tempfile::tempdir().unwrap();
    let tar = tarball(&h, dir.path());
    let import = |name: &str, extra: &str| {
        let b: Vec<String> = h
            .cmd(&[])
            .get_args()
            .map(|a| sh_quote(Path::new(a)))
            .collect();
        format!(
            "{} {} {extra} template import {} --name {name}",
            sh_quote(&berth_bin()),
            b.join(" "),
            sh_quote(&tar)
        )
    };

    // Piped (with and without NO_COLOR): the log line, and no escape code of any kind.
    for (i, no_color) in [None, Some("1")].into_iter().enumerate() {
        let name = format!("piped{i}");
        let mut c = h.cmd(&["-v", "template", "import"]);
        c.arg(&tar).args(["--name", &name]).env_remove("NO_COLOR");
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{o:?}");
        let err = text(&o.stderr);
        assert!(err.contains("imported template"), "no log line: {err}");
        assert!(!err.contains('\x1b'), "escape code in a pipe: {err:?}");
        assert!(!err.contains("unpacking") && !err.contains('\r'), "{err:?}");
        assert_eq!(text(&o.stdout), format!("template {name} imported\n"));
    }

    // On a terminal: coloured logs and a bar…
    let tty = on_tty(&import("tty", "-v"), &[]);
    assert!(tty.contains("imported template"), "{tty:?}");
    assert!(has_sgr(&tty), "no colour on a terminal: {tty:?}");
    assert!(
        tty.contains("unpacking"),
        "no progress on a terminal: {tty:?}"
    );
    // …NO_COLOR takes the colour away (the bar stays, it draws with cursor moves only)…
    let tty = on_tty(&import("nocolor", "-v"), &[("NO_COLOR", "1")]);
    assert!(tty.contains("imported template"), "{tty:?}");
    assert!(!has_sgr(&tty), "colour with NO_COLOR: {tty:?}");
    // …and -q the bar (and the info log).
    let tty = on_tty(&import("quiet", "-q"), &[]);
    assert!(!tty.contains("unpacking"), "progress with -q: {tty:?}");
    assert!(tty.contains("template quiet imported"), "{tty:?}");

    let list = h.json(&["template", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(6), "{list}");
}
