//! Whether a just-exec'd CT has settled: every task of its process tree sleeps with nothing of
//! its own to wake it, at one and the same moment.
//!
//! A snapshot walks the tree from init (`/proc/<pid>/task/<tid>/children`; orphans are
//! reparented to init, so the walk sees the whole pid namespace) and for each task reads its
//! state (`stat`), the system call it sleeps in (`syscall`) and how often it was switched out
//! (`schedstat`'s timeslice count); a process that is not a native 64-bit one counts as busy
//! (its system call numbers are another table). A task is quiet when it sleeps (`S`) in a call
//! that waits forever or longer than the watch window (a `sleep 0.3` or a poll with a 100 ms timeout is
//! not quiet; sysvinit's 5 s select is). Two quiet snapshots with the same tasks and the same
//! switch counts mean no task ran between the first's read and the second's, so at the moment
//! between them all were asleep together, and nothing in the CT can wake another: only the
//! outside world (a packet, the console, a signal from the host) or a timer /proc does not show
//! (an alarm, a POSIX timer, a timerfd behind an epoll) can. Anything unreadable counts as busy,
//! which only costs waiting out the window.

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// One quiet snapshot: every task with its switch count, in walk order.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Quiet(Vec<(i32, u64)>);

/// A quiet snapshot of init's tree, or None when some task runs, may run soon, or can't be read.
pub(super) fn snapshot(init_pid: i32, window: Duration) -> Option<Quiet> {
    let mut tasks = Vec::new();
    let mut pids = vec![init_pid];
    while let Some(pid) = pids.pop() {
        // A zombie has no executable any more; its task is skipped below.
        if !native(pid) && !zombie(pid) {
            return None;
        }
        let tdir = format!("/proc/{pid}/task");
        let mut tids: Vec<i32> = fs::read_dir(&tdir)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        tids.sort_unstable();
        for tid in tids {
            let base = format!("{tdir}/{tid}");
            match task_state(&fs::read_to_string(format!("{base}/stat")).ok()?)? {
                // A zombie no longer runs; its parent is accounted for by its own state.
                'Z' => continue,
                'S' => {}
                _ => return None,
            }
            let line = fs::read_to_string(format!("{base}/syscall")).ok()?;
            let call = Syscall::parse(&line)?;
            if !quiet(&call, window, |addr| read_pair(&base, addr))? {
                return None;
            }
            let switches = switches(&base)?;
            tasks.push((tid, switches));
            for c in fs::read_to_string(format!("{base}/children"))
                .ok()?
                .split_whitespace()
            {
                pids.push(c.parse().ok()?);
            }
        }
    }
    Some(Quiet(tasks))
}

/// Whether the process runs a 64-bit ELF like the monitor: a 32-bit one's `syscall` file holds
/// the compat numbers (i386 162 is nanosleep, x86_64 162 is sync), which `wait_of` would misread.
fn native(pid: i32) -> bool {
    let mut h = [0u8; 5];
    fs::File::open(format!("/proc/{pid}/exe"))
        .and_then(|f| f.read_exact_at(&mut h, 0))
        .is_ok_and(|()| &h[..4] == b"\x7fELF" && h[4] == ELF_CLASS)
}

fn zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| task_state(&s))
        == Some('Z')
}

#[cfg(target_pointer_width = "64")]
const ELF_CLASS: u8 = 2;
#[cfg(target_pointer_width = "32")]
const ELF_CLASS: u8 = 1;

/// The state letter of a `/proc/<pid>/stat` line (after the last ')': comm may hold anything).
fn task_state(stat: &str) -> Option<char> {
    stat.get(stat.rfind(')')? + 1..)?
        .trim_start()
        .chars()
        .next()
}

/// How often the task was scheduled: `schedstat`'s timeslice count, or without schedstats in
/// the kernel (CONFIG_SCHED_INFO) its context switches, which also move when a task that slept
/// runs and sleeps again (one that still runs is not asleep, whatever its count).
fn switches(task_dir: &str) -> Option<u64> {
    if let Ok(s) = fs::read_to_string(format!("{task_dir}/schedstat")) {
        return timeslices(&s);
    }
    ctxt_switches(&fs::read_to_string(format!("{task_dir}/status")).ok()?)
}

/// The third field of `schedstat`: how many times the task ran on a CPU.
fn timeslices(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(2)?.parse().ok()
}

/// voluntary + nonvoluntary context switches from a `status` file.
fn ctxt_switches(status: &str) -> Option<u64> {
    let mut n = None::<u64>;
    for l in status.lines() {
        if let Some(v) = l
            .strip_prefix("voluntary_ctxt_switches:")
            .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        {
            n = Some(n.unwrap_or(0) + v.trim().parse::<u64>().ok()?);
        }
    }
    n
}

/// A task's `/proc/.../syscall` line while it sleeps in a system call.
#[derive(Debug, PartialEq, Eq)]
struct Syscall {
    nr: i64,
    args: [u64; 6],
}

impl Syscall {
    /// None for "running" and for "-1 …" (not in a system call): such a task is not asleep.
    fn parse(line: &str) -> Option<Self> {
        let mut f = line.split_whitespace();
        let nr: i64 = f.next()?.parse().ok()?;
        if nr < 0 {
            return None;
        }
        let mut args = [0u64; 6];
        for a in &mut args {
            *a = u64::from_str_radix(f.next()?.strip_prefix("0x")?, 16).ok()?;
        }
        Some(Self { nr, args })
    }
}

/// How long a sleeping system call waits on its own.
#[derive(Debug, PartialEq, Eq)]
enum Wait {
    /// Only another process or the outside world ends it.
    Forever,
    /// It times out after this long at the latest (counted from when it began).
    For(Duration),
    /// An absolute deadline or a call this module does not read: treated as "soon".
    Unknown,
}

/// Whether a task sleeping in `call` stays asleep past the watch window by itself. `mem` reads
/// two 64-bit words (a timespec or timeval) at an address of the task.
fn quiet(
    call: &Syscall,
    window: Duration,
    mem: impl Fn(u64) -> Option<(i64, i64)>,
) -> Option<bool> {
    Some(match wait_of(call, mem) {
        Wait::Forever => true,
        // The call began after init's exec, so it cannot end before exec + timeout.
        Wait::For(d) => d >= window,
        Wait::Unknown => false,
    })
}

fn wait_of(call: &Syscall, mem: impl Fn(u64) -> Option<(i64, i64)>) -> Wait {
    let a = call.args;
    let ms = |t: u64| match t as i32 {
        t if t < 0 => Wait::Forever,
        t => Wait::For(Duration::from_millis(t as u64)),
    };
    // A NULL timeout pointer waits forever; otherwise read it (nanoseconds or microseconds).
    let ptr = |p: u64, unit_ns: u64| {
        if p == 0 {
            return Wait::Forever;
        }
        match mem(p) {
            Some((s, sub)) if s >= 0 && sub >= 0 => Wait::For(
                Duration::from_secs(s as u64) + Duration::from_nanos((sub as u64) * unit_ns),
            ),
            _ => Wait::Unknown,
        }
    };
    match call.nr {
        libc::SYS_nanosleep => ptr(a[0], 1),
        libc::SYS_clock_nanosleep if a[1] & libc::TIMER_ABSTIME as u64 != 0 => Wait::Unknown,
        libc::SYS_clock_nanosleep => ptr(a[2], 1),
        libc::SYS_ppoll | libc::SYS_rt_sigtimedwait => ptr(a[2], 1),
        libc::SYS_epoll_pwait2 => ptr(a[3], 1),
        libc::SYS_pselect6 => ptr(a[4], 1),
        libc::SYS_epoll_pwait => ms(a[3]),
        libc::SYS_futex => {
            // FUTEX_WAIT's timeout is relative; the others' are absolute deadlines.
            let cmd = a[1] as i32 & !(libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME);
            match (cmd, a[3]) {
                (_, 0) => Wait::Forever,
                (libc::FUTEX_WAIT, p) => ptr(p, 1),
                _ => Wait::Unknown,
            }
        }
        libc::SYS_recvmmsg
        | libc::SYS_semtimedop
        | libc::SYS_mq_timedreceive
        | libc::SYS_io_getevents => Wait::Unknown,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_poll => ms(a[2]),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_epoll_wait => ms(a[3]),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_select => ptr(a[4], 1000),
        // read, wait4, pause, accept, rt_sigsuspend, ...: woken only by someone else.
        _ => Wait::Forever,
    }
}

/// Two native words at `addr` in the task's memory.
fn read_pair(task_dir: &str, addr: u64) -> Option<(i64, i64)> {
    let f = fs::File::open(format!("{task_dir}/mem")).ok()?;
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, addr).ok()?;
    let (x, y) = b.split_at(8);
    Some((
        i64::from_ne_bytes(x.try_into().ok()?),
        i64::from_ne_bytes(y.try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(1);

    fn call(nr: i64, args: [u64; 6]) -> Syscall {
        Syscall { nr, args }
    }

    fn no_mem(_: u64) -> Option<(i64, i64)> {
        None
    }

    #[test]
    fn parses_proc_lines() {
        assert_eq!(task_state("42 (a) b) S 1 2"), Some('S'));
        assert_eq!(task_state("7 (sh) Z 1"), Some('Z'));
        assert_eq!(task_state("garbage"), None);
        assert_eq!(timeslices("131005 2230405 2\n"), Some(2));
        assert_eq!(timeslices("1 2"), None);
        let status = "Name:\tsh\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t12\n\
                      nonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(ctxt_switches(status), Some(15));
        assert_eq!(ctxt_switches("Name:\tsh\n"), None);
        assert_eq!(ctxt_switches("voluntary_ctxt_switches:\tlots\n"), None);
        let me = format!("/proc/self/task/{}", nix::unistd::gettid());
        assert!(switches(&me).is_some());
        assert!(native(std::process::id() as i32));
        assert!(!native(i32::MAX));
        assert_eq!(Syscall::parse("running\n"), None);
        assert_eq!(Syscall::parse("-1 0x7ffd 0x4011\n"), None);
        let line =
            "230 0x0 0x0 0x7ffee998c400 0x7ffee998c440 0x0 0x0 0x7ffee998c3e8 0x7f4af00c7503";
        assert_eq!(
            Syscall::parse(line),
            Some(call(230, [0, 0, 0x7ffe_e998_c400, 0x7ffe_e998_c440, 0, 0]))
        );
        assert_eq!(Syscall::parse("61 0x1 0x2"), None);
    }

    #[test]
    fn timeouts_decide() {
        let mem = |p: u64| match p {
            0x1000 => Some((0, 300_000_000)),
            0x2000 => Some((5, 0)),
            0x3000 => Some((0, 999_999)),
            _ => None,
        };
        let q = |c: Syscall| quiet(&c, W, mem).unwrap();
        // sleep 0.3 vs sleep 5
        assert!(!q(call(libc::SYS_nanosleep, [0x1000, 0, 0, 0, 0, 0])));
        assert!(q(call(libc::SYS_nanosleep, [0x2000, 0, 0, 0, 0, 0])));
        assert!(!q(call(libc::SYS_clock_nanosleep, [0, 0, 0x1000, 0, 0, 0])));
        assert!(q(call(libc::SYS_clock_nanosleep, [0, 0, 0x2000, 0, 0, 0])));
        let abs = libc::TIMER_ABSTIME as u64;
        assert!(!q(call(
            libc::SYS_clock_nanosleep,
            [0, abs, 0x2000, 0, 0, 0]
        )));
        // busybox init: rt_sigtimedwait with no timeout
        assert!(q(call(libc::SYS_rt_sigtimedwait, [0x10, 0, 0, 8, 0, 0])));
        assert!(!q(call(
            libc::SYS_rt_sigtimedwait,
            [0x10, 0, 0x3000, 8, 0, 0]
        )));
        assert!(q(call(libc::SYS_ppoll, [0x10, 1, 0, 0, 8, 0])));
        assert!(!q(call(libc::SYS_ppoll, [0x10, 1, 0x1000, 0, 8, 0])));
        assert!(q(call(libc::SYS_pselect6, [1, 0, 0, 0, 0x2000, 0])));
        assert!(!q(call(libc::SYS_pselect6, [1, 0, 0, 0, 0x1000, 0])));
        assert!(q(call(
            libc::SYS_epoll_pwait,
            [3, 0, 8, u32::MAX as u64, 0, 0]
        )));
        assert!(!q(call(libc::SYS_epoll_pwait, [3, 0, 8, 100, 0, 0])));
        assert!(q(call(libc::SYS_epoll_pwait, [3, 0, 8, 5000, 0, 0])));
        // epoll_pwait2's timeout is its fourth argument
        assert!(!q(call(
            libc::SYS_epoll_pwait2,
            [3, 0, 0x2000, 0x1000, 0, 0]
        )));
        assert!(q(call(libc::SYS_epoll_pwait2, [3, 0, 0x1000, 0, 0, 0])));
        // futex: relative FUTEX_WAIT, absolute WAIT_BITSET
        let wait = (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as u64;
        assert!(q(call(libc::SYS_futex, [0x10, wait, 0, 0, 0, 0])));
        assert!(!q(call(libc::SYS_futex, [0x10, wait, 0, 0x1000, 0, 0])));
        let bitset = libc::FUTEX_WAIT_BITSET as u64;
        assert!(!q(call(libc::SYS_futex, [0x10, bitset, 0, 0x2000, 0, 0])));
        // blocked on someone else
        assert!(q(call(libc::SYS_wait4, [u64::MAX, 0, 0, 0, 0, 0])));
        assert!(q(call(libc::SYS_read, [0, 0x10, 1, 0, 0, 0])));
        assert!(!q(call(libc::SYS_io_getevents, [0; 6])));
        #[cfg(target_arch = "x86_64")]
        {
            assert!(q(call(libc::SYS_poll, [0x10, 1, u32::MAX as u64, 0, 0, 0])));
            assert!(!q(call(libc::SYS_poll, [0x10, 1, 10, 0, 0, 0])));
            assert!(q(call(
                libc::SYS_epoll_wait,
                [3, 0, 8, u32::MAX as u64, 0, 0]
            )));
            // select's timeval: (5 s, 0 µs) vs (0 s, 999999 µs)
            assert!(q(call(libc::SYS_select, [1, 0, 0, 0, 0x2000, 0])));
            assert!(!q(call(libc::SYS_select, [1, 0, 0, 0, 0x3000, 0])));
        }
    }

    #[test]
    fn unreadable_timeouts_count_as_soon() {
        assert_eq!(
            wait_of(&call(libc::SYS_nanosleep, [0x1000, 0, 0, 0, 0, 0]), no_mem),
            Wait::Unknown
        );
        assert_eq!(
            wait_of(&call(libc::SYS_nanosleep, [0x1000, 0, 0, 0, 0, 0]), |_| {
                Some((-1, 0))
            }),
            Wait::Unknown
        );
    }

    /// The calling test process's own tree: a child sleeping for 5 s is quiet, one sleeping
    /// for 0.9 s is not, and a running process never is.
    #[test]
    fn real_processes() {
        let spawn = |secs: &str| {
            std::process::Command::new("sleep")
                .arg(secs)
                .spawn()
                .unwrap()
        };
        let wait_asleep = |pid: i32| {
            for _ in 0..200 {
                let s = fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
                if Syscall::parse(&s).is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("{pid} never slept");
        };
        let mut long = spawn("5");
        let mut short = spawn("0.9");
        let (lp, sp) = (long.id() as i32, short.id() as i32);
        wait_asleep(lp);
        wait_asleep(sp);
        // In a syscall is not yet in its nanosleep on a loaded machine (the loader may still be
        // faulting pages in): quiet within a second is what matters.
        let a = (0..200)
            .find_map(|_| {
                let s = snapshot(lp, W);
                if s.is_none() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                s
            })
            .expect("sleep 5 is quiet");
        let b = snapshot(lp, W).expect("still quiet");
        assert_eq!(a, b, "no switches while asleep");
        assert_eq!(a.0.len(), 1);
        assert_eq!(snapshot(sp, W), None, "sleep 0.9 wakes within the window");
        assert_eq!(
            snapshot(std::process::id() as i32, W),
            None,
            "this test runs"
        );
        assert_eq!(snapshot(i32::MAX, W), None);
        // an unreaped child (a zombie) does not keep its quiet parent busy
        let mut parent = std::process::Command::new("sh")
            .args(["-c", "sleep 0 & exec sleep 5"])
            .spawn()
            .unwrap();
        let pp = parent.id() as i32;
        let has_zombie = || {
            fs::read_to_string(format!("/proc/{pp}/task/{pp}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .any(|c| zombie(c.parse().unwrap()))
        };
        for _ in 0..200 {
            if has_zombie() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(has_zombie(), "no zombie child under {pp}");
        wait_asleep(pp);
        let z = snapshot(pp, W).expect("quiet with a zombie child");
        assert_eq!(z.0.len(), 1, "{z:?}");
        for c in [&mut long, &mut short, &mut parent] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
