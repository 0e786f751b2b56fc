//! Opening a pinned datapath without changing anything in the kernel, for readers (berthd)
//! that must never load programs, create pins or attach: everything is opened from existing
//! pins with `BPF_OBJ_GET`, and a missing datapath is reported as `None`, not created.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::SchedClassifier;
use berth_common::{map_names, program_names};

use super::{AttachMethod, Datapath, FROM_CT_FILE, Result, TO_CT_FILE, io_err, prog_err};

/// The programs of one pinned build, if any `progs/<hash>/` holds both (after an upgrade
/// only the newest build's directory is left; while one is being swapped any complete one
/// does: readers use the maps, never the programs).
fn pinned_programs(progs_root: &Path) -> Result<Option<(PathBuf, PathBuf)>> {
    let entries = match fs::read_dir(progs_root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("listing", progs_root)(e)),
    };
    for entry in entries {
        let dir = entry.map_err(io_err("listing", progs_root))?.path();
        let (from, to) = (dir.join(FROM_CT_FILE), dir.join(TO_CT_FILE));
        if from.exists() && to.exists() {
            return Ok(Some((from, to)));
        }
    }
    Ok(None)
}

impl Datapath {
    /// Opens the datapath pinned under `pin_dir` read-only: nothing is loaded, pinned,
    /// created, locked or attached. `Ok(None)` when no datapath is pinned there (never
    /// loaded, or unloaded). A pinned map with another layout is an error
    /// ([`super::DatapathError::IncompatibleMap`]), like for [`Self::open_or_load`].
    ///
    /// The handle supports the read methods ([`Self::counters`], [`Self::drops`],
    /// [`Self::classes`], [`Self::config`], [`Self::attached`], [`Self::ct_addrs`]).
    pub fn open_pinned_readonly(pin_dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        let maps_dir = pin_dir.join("maps");
        if map_names::ALL
            .iter()
            .any(|name| !maps_dir.join(name).exists())
        {
            return Ok(None);
        }
        let Some((from_path, to_path)) = pinned_programs(&pin_dir.join("progs"))? else {
            return Ok(None);
        };
        let from_ct = SchedClassifier::from_pin(&from_path)
            .map_err(prog_err(program_names::FROM_CT, "opening pin"))?;
        let to_ct = SchedClassifier::from_pin(&to_path)
            .map_err(prog_err(program_names::TO_CT, "opening pin"))?;
        Self::from_pins(pin_dir, &maps_dir, from_ct, to_ct, AttachMethod::detect()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_pinned_is_none_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("v2");
        assert!(Datapath::open_pinned_readonly(&pin).unwrap().is_none());
        assert!(
            !pin.exists(),
            "a read-only open must not create the pin dir"
        );
        assert_eq!(pinned_programs(&pin.join("progs")).unwrap(), None);
    }
}
