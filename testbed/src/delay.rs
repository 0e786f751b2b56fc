//! The delay line: a link's delay (and jitter) without netem. A node with `delay` gets a
//! namespace of its own between it and the host, holding two interfaces, `d0` (the node's
//! side) and `d1` (the host's), with no addresses and IPv6 off, so that namespace's stack
//! never speaks. Threads of the supervisor read every frame arriving on one side from an
//! AF_PACKET socket, queue it with a deadline (now + delay ± jitter) and write it to the
//! other side when the deadline comes: a transparent L2 wire, ARP and neighbour discovery
//! delayed like the rest.
//!
//! Both sockets use `PACKET_VNET_HDR`: a frame is read with the virtio-net header describing
//! its pending checksum and segmentation, and written back with it, so a veth's
//! checksum-offloaded or GSO frame leaves the other side as valid as it came in.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, Result};

const SOL_PACKET: libc::c_int = 263;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const ETH_P_ALL: u16 = 0x0003;
/// A GSO frame of a veth is at most 64 KiB, plus the virtio-net header.
const FRAME_MAX: usize = 65_536 + 64;
/// Frames held per direction; beyond it new frames are dropped (netem's default limit is 1000).
const QUEUE_MAX: usize = 10_000;

/// A running delay line; dropping it stops its threads.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    queues: Vec<Arc<Queue>>,
    threads: Vec<JoinHandle<()>>,
}

/// A frame waiting for its deadline (the sequence number keeps equal deadlines in order).
type Held = Reverse<(Instant, u64, Vec<u8>)>;

struct Queue {
    heap: Mutex<BinaryHeap<Held>>,
    ready: Condvar,
}

/// Runs `f` on a thread that first joins the network namespace of `pid` (sockets it makes
/// stay in that namespace whichever thread uses them later).
pub fn in_netns_thread<T: Send + 'static>(
    pid: i32,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let op = format!("join the network namespace of PID {pid}");
    std::thread::spawn(move || -> std::io::Result<T> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        // SAFETY: setns on this thread only, with a descriptor we own.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| Error::failed(op.clone(), "the thread panicked"))?
    .map_err(Error::io(op))
}

fn packet_socket(ifname: &str) -> std::io::Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: plain libc calls on a descriptor owned below; every pointer is to a local.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for opt in [PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING] {
            if libc::setsockopt(
                fd.as_raw_fd(),
                SOL_PACKET,
                opt,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        // A burst must not overflow the socket while the reader is off the CPU.
        let buf: libc::c_int = 16 << 20;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&buf as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
        // The reader looks at the stop flag this often.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        if libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// splitmix64: the jitter's random numbers (repeatable for one seed).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl DelayLine {
    /// Starts the line between interfaces `a` and `b` of the network namespace of `pid`:
    /// every frame waits `delay` ± a uniform `jitter` (jitter may reorder frames, as netem's).
    pub fn start(
        pid: i32,
        a: &str,
        b: &str,
        delay: Duration,
        jitter: Duration,
        seed: u64,
    ) -> Result<DelayLine> {
        let (an, bn) = (a.to_owned(), b.to_owned());
        let (sa, sb) =
            in_netns_thread(pid, move || Ok((packet_socket(&an)?, packet_socket(&bn)?)))?;
        let (sa, sb) = (Arc::new(sa), Arc::new(sb));
        let stop = Arc::new(AtomicBool::new(false));
        let mut line = DelayLine {
            stop: stop.clone(),
            queues: Vec::new(),
            threads: Vec::new(),
        };
        for (i, (from, to)) in [(sa.clone(), sb.clone()), (sb, sa)].into_iter().enumerate() {
            let q = Arc::new(Queue {
                heap: Mutex::new(BinaryHeap::new()),
                ready: Condvar::new(),
            });
            line.queues.push(q.clone());
            let (q2, stop1, stop2) = (q.clone(), stop.clone(), stop.clone());
            let mut rng = seed ^ (i as u64 + 1).wrapping_mul(0xd6e8_feb8_6659_fd93);
            line.threads.push(std::thread::spawn(move || {
                receive(&from, &q, &stop1, delay, jitter, &mut rng)
            }));
            line.threads
                .push(std::thread::spawn(move || transmit(&to, &q2, &stop2)));
        }
        Ok(line)
    }
}

fn receive(
    fd: &OwnedFd,
    q: &Queue,
    stop: &AtomicBool,
    delay: Duration,
    jitter: Duration,
    rng: &mut u64,
) {
    let mut buf = vec![0u8; FRAME_MAX];
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: recv into a buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let now = Instant::now();
        let wait = if jitter.is_zero() {
            delay
        } else {
            let span = jitter.as_nanos() as u64 * 2 + 1;
            let off = next(rng) % span;
            (delay + Duration::from_nanos(off)).saturating_sub(jitter)
        };
        let mut heap = q.heap.lock().unwrap_or_else(|p| p.into_inner());
        if heap.len() < QUEUE_MAX {
            seq += 1;
            heap.push(Reverse((now + wait, seq, buf[..n as usize].to_vec())));
            q.ready.notify_one();
        }
    }
}

fn transmit(fd: &OwnedFd, q: &Queue, stop: &AtomicBool) {
    let mut heap = q.heap.lock().unwrap_or_else(|p| p.into_inner());
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = match heap.peek() {
            Some(Reverse((due, _, _))) if *due <= now => {
                let Some(Reverse((_, _, frame))) = heap.pop() else {
                    continue;
                };
                drop(heap);
                // SAFETY: send of a buffer of the given length on a bound packet socket. A
                // failed send is a lost frame, as on a real wire.
                unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                heap = q.heap.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            Some(Reverse((due, _, _))) => *due - now,
            None => Duration::from_millis(100),
        };
        heap = q
            .ready
            .wait_timeout(heap, wait)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for q in &self.queues {
            q.ready.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
