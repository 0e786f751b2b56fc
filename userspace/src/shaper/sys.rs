//! Kernel interfaces the shaper needs beyond aya and rtnetlink: opening a pinned link as a raw
//! fd to read which interface and program it is bound to, ifindex ↔ name, and the kernel
//! config (for the backend choice).

use std::{
    ffi::{CStr, CString},
    fs,
    io::{self, Read},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// (program id, ifindex) of the TCX link pinned at `path`; ifindex 0 once its interface is
/// gone (the kernel keeps a pinned link object after detaching it).
pub fn tcx_link(path: &Path) -> io::Result<(u32, u32)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr is the BPF_OBJ_GET prefix of union bpf_attr; c outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjGetAttr as *mut libc::c_void,
            size_of::<ObjGetAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    let field = |name: &str| -> Option<u32> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    match (field("prog_id"), field("ifindex")) {
        (Some(p), Some(i)) => Ok((p, i)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "pinned object is not a TCX link",
        )),
    }
}

pub fn if_indextoname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

pub fn if_nametoindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: NUL-terminated string valid for the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The running kernel's config text (`/proc/config.gz`, else `/boot/config-<release>`).
pub fn kernel_config() -> Option<String> {
    if let Ok(f) = fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(text);
        }
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
}

/// Whether a module for `name` (e.g. `sch_fq`) is installed for the running kernel.
pub fn module_installed(name: &str) -> bool {
    let Ok(release) = fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let dir = Path::new("/lib/modules").join(release.trim());
    let needle = format!("/{name}.ko");
    ["modules.dep", "modules.builtin"].iter().any(|f| {
        fs::read_to_string(dir.join(f))
            .map(|t| t.lines().any(|l| l.contains(&needle)))
            .unwrap_or(false)
    })
}
