//! Load-or-open of a build's pinned programs.
//!
//! Each user (the datapath, the shaper) pins its programs under `<its dir>/progs/<build>/`,
//! `<build>` being [`super::build_id`]. The first process of a new build loads them from the
//! object over the already pinned maps (created and pinned where missing, never recreated),
//! pins them, and reports `fresh` so the caller can switch its attachments over before
//! [`sweep_old_builds`] unpins the previous build's programs (the kernel frees them once no
//! link or filter uses them).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{EbpfLoader, programs::SchedClassifier};
use tracing::{info, warn};

use super::{
    BpfError, Result, create_dirs, io_err, object, prog_err, remove_contents, remove_tree,
};

/// Maps bound to pins by a load: every name in `names` at `dir/<name>`.
#[derive(Clone, Copy, Debug)]
pub struct MapPins<'a> {
    pub dir: &'a Path,
    pub names: &'a [&'static str],
}

/// A program of the object and the file it is pinned as.
#[derive(Clone, Copy, Debug)]
pub struct ProgramSpec {
    /// The program's name in the object.
    pub name: &'static str,
    /// Its pin's file name in the build directory.
    pub file: &'static str,
    /// A program the kernel may reject (it uses a newer feature): then it is not pinned, a
    /// warning is logged, and [`Programs::take`] gives `None`.
    pub optional: bool,
}

impl ProgramSpec {
    pub const fn required(name: &'static str, file: &'static str) -> Self {
        Self {
            name,
            file,
            optional: false,
        }
    }

    pub const fn optional(name: &'static str, file: &'static str) -> Self {
        Self {
            name,
            file,
            optional: true,
        }
    }
}

/// The programs of this build, opened from their pins.
pub struct Programs {
    /// Loaded by this call (a first use or an upgrade): the caller moves its attachments to
    /// these programs and then calls [`sweep_old_builds`].
    pub fresh: bool,
    progs: Vec<(&'static str, Option<SchedClassifier>)>,
}

impl Programs {
    /// The program pinned as `file`; `None` for an optional one the kernel rejected, or when
    /// taken already.
    pub fn take(&mut self, file: &str) -> Option<SchedClassifier> {
        self.progs
            .iter_mut()
            .find(|(f, _)| *f == file)
            .and_then(|(_, p)| p.take())
    }

    /// [`Self::take`] for a program that is not optional.
    pub fn take_required(&mut self, spec: &ProgramSpec) -> Result<SchedClassifier> {
        self.take(spec.file)
            .ok_or(aya::programs::ProgramError::NotLoaded)
            .map_err(prog_err(spec.name, "opening pin"))
    }
}

/// Opens this build's programs pinned under `progs_root/<build>/`, loading and pinning them
/// first when one that is not optional is missing. Call with the owner's [`super::PinLock`]
/// held.
pub fn load_or_open(
    progs_root: &Path,
    maps: &[MapPins<'_>],
    specs: &[ProgramSpec],
) -> Result<Programs> {
    let build = progs_root.join(super::build_id());
    let fresh = specs
        .iter()
        .any(|s| !s.optional && !build.join(s.file).exists());
    if fresh {
        // A previous attempt may have died between two pins.
        remove_contents(&build)?;
        create_dirs(&[&build])?;
        let at: Vec<(ProgramSpec, PathBuf)> =
            specs.iter().map(|s| (*s, build.join(s.file))).collect();
        load_and_pin(maps, &at)?;
        info!(dir = %build.display(), "loaded and pinned eBPF programs");
    }
    let mut progs = Vec::with_capacity(specs.len());
    for s in specs {
        let path = build.join(s.file);
        let prog = if s.optional && !path.exists() {
            None
        } else {
            Some(SchedClassifier::from_pin(&path).map_err(prog_err(s.name, "opening pin"))?)
        };
        progs.push((s.file, prog));
    }
    Ok(Programs { fresh, progs })
}

/// Loads each program of `progs` from the object over the pinned `maps` and pins it at its
/// path. An optional program the kernel rejects is logged and left unpinned.
pub fn load_and_pin(maps: &[MapPins<'_>], progs: &[(ProgramSpec, PathBuf)]) -> Result<()> {
    let mut loader = EbpfLoader::new();
    for m in maps {
        for name in m.names {
            // Reuses the pinned map if it exists, creates and pins it otherwise.
            loader.map_pin_path(name, m.dir.join(name));
        }
    }
    let mut ebpf = loader.load(object()?).map_err(|e| BpfError::Load {
        maps_dir: maps.first().map(|m| m.dir.to_owned()).unwrap_or_default(),
        source: Box::new(e),
    })?;
    for (spec, path) in progs {
        let name = spec.name;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(aya::programs::ProgramError::NotLoaded)
            .map_err(prog_err(name, "finding in the object"))?
            .try_into()
            .map_err(prog_err(name, "typing"))?;
        match prog.load() {
            Ok(()) => {}
            Err(e) if spec.optional => {
                warn!(program = name, error = %e, "optional eBPF program not loaded");
                continue;
            }
            Err(e) => return Err(prog_err(name, "loading (verifier)")(e)),
        }
        prog.pin(path).map_err(|source| BpfError::PinProgram {
            program: name,
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Loads one program of the object over the pinned `maps`, pins it at `path` and returns it
/// opened from that pin (the caller unpins it when done).
pub fn load_one(maps: &[MapPins<'_>], spec: ProgramSpec, path: &Path) -> Result<SchedClassifier> {
    load_and_pin(maps, &[(spec, path.to_owned())])?;
    SchedClassifier::from_pin(path).map_err(prog_err(spec.name, "opening pin"))
}

/// Unpins every build under `progs_root` but this binary's.
pub fn sweep_old_builds(progs_root: &Path) -> Result<()> {
    let current = super::build_id();
    let entries = match fs::read_dir(progs_root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", progs_root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("listing", progs_root))?;
        if entry.file_name().to_string_lossy() != current {
            let old = entry.path();
            remove_tree(&old)?;
            info!(path = %old.display(), "removed the programs of an older build");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_keeps_only_this_build() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for b in [super::super::build_id(), "0123456789abcdef".to_owned()] {
            fs::create_dir_all(root.join(&b)).unwrap();
            fs::write(root.join(&b).join("prog"), b"").unwrap();
        }
        sweep_old_builds(root).unwrap();
        let left: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec![super::super::build_id()]);
        sweep_old_builds(&root.join("missing")).unwrap();
    }
}
