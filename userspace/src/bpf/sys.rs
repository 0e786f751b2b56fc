//! The few kernel interfaces aya 0.14 does not wrap: `BPF_OBJ_GET` for a raw fd (read-only map
//! fds for readers, a pinned link's fdinfo), `BPF_MAP_LOOKUP_BATCH`, bpffs detection and
//! mounting, and ifindex ↔ name translation. The only module of berth that calls `bpf(2)`
//! itself.

use std::{
    ffi::{CStr, CString},
    fs, io,
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya::Pod;

// enum bpf_cmd values from include/uapi/linux/bpf.h (stable ABI).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `file_flags` of BPF_OBJ_GET: an fd the kernel refuses writes through (map_update_elem and
/// map_delete_elem need FMODE_CAN_WRITE, kernel/bpf/syscall.c).
const BPF_F_RDONLY: u32 = 1 << 3;

/// f_type of a bpf filesystem (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a #[repr(C)] prefix of union bpf_attr for `cmd`, valid for the call; the
    // kernel only reads/writes size_of::<T>() bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Opens a pinned bpf object (map, program or link) as a raw fd.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    obj_get_flags(path, 0)
}

/// Opens a pinned map as a read-only fd: lookups work, updates and deletes fail with EPERM.
pub fn obj_get_readonly(path: &Path) -> io::Result<OwnedFd> {
    obj_get_flags(path, BPF_F_RDONLY)
}

fn obj_get_flags(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        file_flags,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What `/proc/self/fdinfo` says about a TCX link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcxLinkInfo {
    pub prog_id: u32,
    /// 0 once the interface is gone (the kernel detaches the link but keeps the object while
    /// it is pinned or open).
    pub ifindex: u32,
}

/// The TCX link pinned at `path`: its program and interface.
pub fn tcx_link(path: &Path) -> io::Result<TcxLinkInfo> {
    tcx_link_info(obj_get(path)?.as_fd())
}

/// Reads a TCX link's program and interface from its fdinfo (`tcx_link_fdinfo`, kernel ≥ 6.6).
pub fn tcx_link_info(fd: BorrowedFd<'_>) -> io::Result<TcxLinkInfo> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    let field = |name: &str| -> Option<u32> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    match (field("prog_id"), field("ifindex")) {
        (Some(prog_id), Some(ifindex)) => Ok(TcxLinkInfo { prog_id, ifindex }),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "link fdinfo has no prog_id/ifindex (not a TCX link)",
        )),
    }
}

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads a whole per-CPU map with `BPF_MAP_LOOKUP_BATCH` (kernel ≥ 5.6): one syscall per
/// `chunk` entries instead of two per entry. Returns `Unsupported` where the kernel lacks it.
pub fn lookup_batch_percpu<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    nr_cpus: usize,
) -> io::Result<Vec<(K, Vec<V>)>> {
    // Per-CPU values are laid out in 8-byte aligned slots, one per possible CPU.
    lookup_batch_inner(map, nr_cpus, size_of::<V>().next_multiple_of(8))
}

/// Reads a whole (not per-CPU) map, hash or array, with `BPF_MAP_LOOKUP_BATCH`.
pub fn lookup_batch<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let rows = lookup_batch_inner::<K, V>(map, 1, size_of::<V>())?;
    Ok(rows
        .into_iter()
        .filter_map(|(k, mut v)| v.pop().map(|v| (k, v)))
        .collect())
}

fn lookup_batch_inner<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    nr_cpus: usize,
    slot: usize,
) -> io::Result<Vec<(K, Vec<V>)>> {
    let mut chunk: usize = 256;
    let mut out = Vec::new();
    let mut token = 0u64; // hash maps use a u32 bucket index as the batch cursor
    let mut first = true;
    loop {
        let mut keys = vec![0u8; chunk * size_of::<K>()];
        let mut values = vec![0u8; chunk * slot * nr_cpus];
        let mut next = 0u64;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u64 as u64
            },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match res {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // A bucket holds more entries than fit in `chunk`: retry the same cursor bigger.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && attr.count == 0 => {
                chunk *= 2;
                continue;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, e));
            }
            Err(e) => return Err(e),
        };
        for i in 0..attr.count as usize {
            // SAFETY: the kernel filled `count` keys of size_of::<K>() bytes; K is Pod.
            let key: K = unsafe {
                std::ptr::read_unaligned(keys.as_ptr().add(i * size_of::<K>()) as *const K)
            };
            let base = i * slot * nr_cpus;
            let vals = (0..nr_cpus)
                .map(|cpu| {
                    // SAFETY: as above, per-CPU slot `cpu` of entry `i`.
                    unsafe {
                        std::ptr::read_unaligned(values.as_ptr().add(base + cpu * slot) as *const V)
                    }
                })
                .collect();
            out.push((key, vals));
        }
        if done {
            return Ok(out);
        }
        token = next;
        first = false;
    }
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path, st a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// `mount -t bpf bpf <path>`.
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(io::Error::from)
}

pub fn if_indextoname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

pub fn if_nametoindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
