//! `cargo xtask install` and `cargo xtask man`: berth, berthd and the vzctl/vzlist entry points
//! into PREFIX/bin, the man pages into PREFIX/share/man/man1 and the shell completions where
//! bash-completion, zsh and fish look under PREFIX. Idempotent: every file is written to a
//! temporary name and renamed over the old one (a running berthd keeps its inode).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, run, workspace_root};

/// The binaries installed.
pub const BINARIES: &[&str] = &["berth", "berth-mon", "berthd", "vzctl", "vzlist"];

/// Builds the binaries (release, or debug with `debug`) and returns their directory.
fn build(debug: bool) -> Result<PathBuf> {
    if debug {
        run(cargo().args(["build", "-p", "berth", "--bins"]))?;
        Ok(workspace_root().join("target/debug"))
    } else {
        crate::build_release()
    }
}

/// `cargo xtask man DIR`: the man pages of every berth command, from the built binary.
pub fn man(dir: &Path, debug: bool) -> Result<()> {
    let bin = build(debug)?.join("berth");
    write_man(&bin, dir)
}

fn write_man(berth: &Path, dir: &Path) -> Result<()> {
    run(Command::new(berth).arg("man").arg(dir))?;
    eprintln!("xtask: man pages in {}", dir.display());
    Ok(())
}

pub fn install(prefix: &Path, debug: bool) -> Result<()> {
    let built = build(debug)?;
    let bin_dir = prefix.join("bin");
    for b in BINARIES {
        put(&built.join(b), &bin_dir.join(b), 0o755)?;
    }
    let berth = bin_dir.join("berth");

    // Man pages: generated into a scratch directory, then put in place one by one.
    let man1 = prefix.join("share/man/man1");
    let scratch = prefix.join("share/man/.berth-man.tmp");
    let _ = std::fs::remove_dir_all(&scratch);
    write_man(&berth, &scratch)?;
    for e in std::fs::read_dir(&scratch).with_context(|| format!("read {}", scratch.display()))? {
        let e = e?;
        put(&e.path(), &man1.join(e.file_name()), 0o644)?;
    }
    std::fs::remove_dir_all(&scratch).with_context(|| format!("remove {}", scratch.display()))?;

    for (shell, path) in [
        ("bash", "share/bash-completion/completions/berth"),
        ("zsh", "share/zsh/site-functions/_berth"),
        ("fish", "share/fish/vendor_completions.d/berth.fish"),
    ] {
        let out = Command::new(&berth)
            .args(["completion", shell])
            .output()
            .with_context(|| format!("run {} completion {shell}", berth.display()))?;
        if !out.status.success() {
            bail!(
                "{} completion {shell} failed: {}",
                berth.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        write(&prefix.join(path), &out.stdout, 0o644)?;
    }
    // man-db caches its index; a refresh lets `man -k`/`apropos` see the new pages (`man
    // berth-create` works without it).
    if prefix == Path::new("/usr/local") && Path::new("/usr/bin/mandb").exists() {
        let _ = Command::new("mandb").arg("-q").status();
    }
    eprintln!(
        "xtask: installed {} into {}/bin, man pages into {}, completions under {}/share",
        BINARIES.join(", "),
        prefix.display(),
        man1.display(),
        prefix.display()
    );
    Ok(())
}

/// Copies `from` to `to` (mode `mode`) through a temporary file renamed into place.
fn put(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let data = std::fs::read(from).with_context(|| format!("read {}", from.display()))?;
    write(to, &data, mode)
}

fn write(to: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to.parent().expect("an installed file has a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if std::fs::read(to).is_ok_and(|old| old == data) {
        return Ok(());
    }
    let name = to.file_name().expect("a file name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.xtask-tmp"));
    std::fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("rename into {}", to.display()))?;
    Ok(())
}
