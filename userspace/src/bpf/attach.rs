//! Attaching berth's classifiers to an interface's tc hooks, over TCX links (pinned, kernel
//! ≥ 6.6) or clsact + cls_bpf direct-action filters, and switching attachments to a new build.
//!
//! The datapath's programs run first on each hook (accounting and anti-spoofing see every
//! packet), the shaper's last (its redirect into the IFB ends the hook): with TCX that is the
//! link order, with cls_bpf the filter priority.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};
use berth_common::shaper::kernel_name;
use serde::Serialize;
use tracing::{debug, warn};

use super::{BpfError, Result, io_err, sys};

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMethod {
    /// TCX links (kernel >= 6.6), pinned under the owner's `links/`.
    Tcx,
    /// clsact qdisc + cls_bpf direct-action filters (the default). The filters hold the
    /// programs themselves; nothing is pinned for them.
    Netlink,
}

impl AttachMethod {
    /// clsact + cls_bpf unless `BERTH_ATTACH=tcx` asks for TCX (kernel >= 6.6, commit
    /// e420bed02507; refused with a clear error below that).
    ///
    /// Why not TCX by default: every TCX link creation swaps the device's bpf_mprog entry and
    /// then waits for a full RCU grace period (tcx_entry_sync) — measured 27-34 ms per CT start
    /// on this 6.18 VM even with both hooks attached in parallel, against 2-7 ms for the qdisc
    /// and two cls_bpf filters, which only publish with RCU and never wait. The programs,
    /// their counting and their verdicts are identical on both paths (same program type, same
    /// direct-action return codes).
    pub fn detect() -> Self {
        match std::env::var("BERTH_ATTACH").as_deref() {
            Ok("tcx") => match KernelVersion::current() {
                Ok(v) if v < KernelVersion::new(6, 6, 0) => {
                    warn!(kernel = ?v, "BERTH_ATTACH=tcx: TCX needs kernel 6.6; using clsact + cls_bpf");
                    Self::Netlink
                }
                _ => Self::Tcx,
            },
            Ok("netlink") | Ok("cls_bpf") | Err(_) => Self::Netlink,
            Ok(other) => {
                warn!(
                    value = other,
                    "BERTH_ATTACH: expected tcx or netlink; using netlink"
                );
                Self::Netlink
            }
        }
    }
}

/// One tc hook of one interface.
#[derive(Clone, Copy, Debug)]
pub struct Hook<'a> {
    pub ifindex: u32,
    pub ifname: &'a str,
    pub attach_type: TcAttachType,
}

/// Where on a hook a program goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Before every other program: TCX first in line, cls_bpf at an auto-assigned priority
    /// (lower, i.e. earlier, than [`Place::Last`]'s).
    First,
    /// After every other program: TCX last in line, cls_bpf at priority `0xfff0`.
    Last,
}

impl Place {
    /// cls_bpf priority: the largest a shaper filter needs to run after the datapath's
    /// auto-assigned (lower) priorities.
    const LAST_PRIORITY: u16 = 0xfff0;

    fn tcx_order(self) -> LinkOrder {
        match self {
            Self::First => LinkOrder::first(),
            Self::Last => LinkOrder::last(),
        }
    }

    fn nl_priority(self) -> u16 {
        match self {
            Self::First => 0,
            Self::Last => Self::LAST_PRIORITY,
        }
    }
}

/// A program to attach to a hook.
pub struct Attachment<'p> {
    pub prog: &'p mut SchedClassifier,
    /// Its name in the object (errors, and finding its cls_bpf filter again).
    pub program: &'static str,
    pub attach_type: TcAttachType,
}

fn attach_err(
    program: &'static str,
    hook: &Hook<'_>,
    op: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> BpfError + use<> {
    let (ifname, ifindex) = (hook.ifname.to_owned(), hook.ifindex);
    move |e| BpfError::Attach {
        program,
        ifname,
        ifindex,
        op,
        source: Box::new(e),
    }
}

fn link_err(
    program: &'static str,
    hook: &Hook<'_>,
    op: &'static str,
) -> impl FnOnce(io::Error) -> BpfError + use<> {
    let (ifname, ifindex) = (hook.ifname.to_owned(), hook.ifindex);
    move |source| BpfError::Link {
        program,
        ifname,
        ifindex,
        op,
        source,
    }
}

/// What a pinned TCX link turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Attached to the hook's interface and now running the given program.
    Current,
    /// No live link: none was pinned, or a dead one (its interface gone, or the ifindex reused
    /// by another interface) was unpinned.
    Missing,
}

/// Brings the TCX link pinned at `path` to `a.prog`: a live link of `hook.ifindex` running
/// another program (an older build) is switched atomically (`BPF_LINK_UPDATE`); a dead link
/// is unpinned.
pub fn refresh_tcx_link(a: &mut Attachment<'_>, hook: &Hook<'_>, path: &Path) -> Result<LinkState> {
    let program = a.program;
    let link = match sys::tcx_link(path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(LinkState::Missing),
        Err(e) => return Err(link_err(program, hook, "opening pinned link")(e)),
    };
    if link.ifindex != hook.ifindex {
        fs::remove_file(path).map_err(link_err(program, hook, "unpinning a dead link"))?;
        debug!(ifindex = hook.ifindex, old_ifindex = link.ifindex, path = %path.display(), "removed dead link pin");
        return Ok(LinkState::Missing);
    }
    let prog_id = a
        .prog
        .info()
        .map_err(attach_err(program, hook, "reading program info"))?
        .id();
    if link.prog_id != prog_id {
        let pinned = PinnedLink::from_pin(path)
            .map_err(|e| link_err(program, hook, "opening pinned link")(io::Error::other(e)))?;
        let tc_link = SchedClassifierLink::try_from(FdLink::from(pinned))
            .map_err(|e| link_err(program, hook, "typing pinned link")(io::Error::other(e)))?;
        let id = a.prog.attach_to_link(tc_link).map_err(attach_err(
            program,
            hook,
            "replacing the program (BPF_LINK_UPDATE)",
        ))?;
        // Dropping our handle closes the fd; the pin keeps the link.
        drop(
            a.prog
                .take_link(id)
                .map_err(attach_err(program, hook, "releasing link"))?,
        );
        debug!(ifindex = hook.ifindex, path = %path.display(), "link switched to the new program");
    }
    Ok(LinkState::Current)
}

/// Attaches `a.prog` to the hook as a new TCX link at `place` and pins the link at `path` (the
/// pin keeps it attached after this process exits).
pub fn create_tcx_link(
    a: &mut Attachment<'_>,
    hook: &Hook<'_>,
    place: Place,
    path: &Path,
) -> Result<()> {
    let program = a.program;
    let id = a
        .prog
        .attach_with_options(
            hook.ifname,
            a.attach_type,
            TcAttachOptions::TcxOrder(place.tcx_order()),
        )
        .map_err(attach_err(program, hook, "attaching (TCX)"))?;
    let link = a
        .prog
        .take_link(id)
        .map_err(attach_err(program, hook, "taking link"))?;
    let fd_link = FdLink::try_from(link)
        .map_err(|e| link_err(program, hook, "converting link")(io::Error::other(e)))?;
    fd_link
        .pin(path)
        .map_err(|e| link_err(program, hook, "pinning link")(io::Error::other(e)))?;
    Ok(())
}

/// [`create_tcx_link`] for several hooks of one interface, each from a thread of its own:
/// every TCX link creation waits for an RCU grace period (tcx_entry_sync after the mprog
/// entry swap; ~5-15 ms each on this 6.18 VM), so the grace periods overlap instead of adding
/// up.
pub fn create_tcx_links(
    jobs: Vec<(Attachment<'_>, PathBuf)>,
    ifname: &str,
    ifindex: u32,
    place: Place,
) -> Result<()> {
    if jobs.len() <= 1 {
        for (mut a, path) in jobs {
            let hook = Hook {
                ifindex,
                ifname,
                attach_type: a.attach_type,
            };
            create_tcx_link(&mut a, &hook, place, &path)?;
        }
        return Ok(());
    }
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(mut a, path)| {
                s.spawn(move || {
                    let hook = Hook {
                        ifindex,
                        ifname,
                        attach_type: a.attach_type,
                    };
                    create_tcx_link(&mut a, &hook, place, &path)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    results.into_iter().collect()
}

/// Attaches `a.prog` as a cls_bpf direct-action filter at `place` (clsact added when missing),
/// replacing our filter of the same program rather than stacking a second one.
pub fn attach_cls_bpf(a: &mut Attachment<'_>, hook: &Hook<'_>, place: Place) -> Result<()> {
    let program = a.program;
    if let Err(e) = tc::qdisc_add_clsact(hook.ifname) {
        // EEXIST when the qdisc is there already; a real failure shows in the attach.
        debug!(ifname = hook.ifname, error = %e, "clsact qdisc not added");
    }
    match remove_cls_bpf(hook.ifname, a.attach_type, program) {
        Ok(()) => {}
        Err(e) => {
            return Err(link_err(program, hook, "removing the previous filter")(
                io::Error::other(e),
            ));
        }
    }
    let id = a
        .prog
        .attach_with_options(
            hook.ifname,
            a.attach_type,
            TcAttachOptions::Netlink(NlOptions {
                priority: place.nl_priority(),
                ..Default::default()
            }),
        )
        .map_err(attach_err(program, hook, "attaching (clsact/cls_bpf)"))?;
    let link = a
        .prog
        .take_link(id)
        .map_err(attach_err(program, hook, "taking link"))?;
    // The filter lives in the qdisc, independent of this process; dropping the handle would
    // delete it.
    std::mem::forget(link);
    Ok(())
}

/// Removes our cls_bpf filter of `program` from the hook; none there (or no clsact) is fine.
/// aya names a filter after the program it was attached from, and a program opened from a
/// pin has the kernel's name, cut to 15 bytes (`berth_shape_to_ct` is `berth_shape_to_`).
fn remove_cls_bpf(
    ifname: &str,
    attach_type: TcAttachType,
    program: &str,
) -> Result<(), tc::TcError> {
    match tc::qdisc_detach_program(ifname, attach_type, kernel_name(program)) {
        Ok(()) => Ok(()),
        Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// [`remove_cls_bpf`] for teardown paths: a failure is logged, not returned (the interface
/// may be going away under us).
pub fn detach_cls_bpf(ifname: &str, attach_type: TcAttachType, program: &str) {
    if let Err(e) = remove_cls_bpf(ifname, attach_type, program) {
        debug!(ifname, program, error = %e, "cls_bpf filter not removed");
    }
}

/// The per-interface link directories `links_root/<ifindex>/` (other entries are skipped).
pub fn link_dirs(links_root: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let entries = match fs::read_dir(links_root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", links_root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", links_root))?;
        if let Ok(ifindex) = entry.file_name().to_string_lossy().parse::<u32>() {
            out.push((ifindex, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether the TCX link pinned at `path` is attached to `ifindex`.
pub fn tcx_link_alive(path: &Path, ifindex: u32) -> bool {
    sys::tcx_link(path).is_ok_and(|l| l.ifindex == ifindex)
}
