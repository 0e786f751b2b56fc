//! The tc objects the shaper uses, over rtnetlink: HTB qdiscs and classes, fifo leaf qdiscs,
//! fq root qdiscs (EDT backend), IFB interfaces. netlink-packet-route 0.34 has no HTB, fifo
//! or fq options, so they are built here as raw attributes (`struct tc_htb_glob`, `struct
//! tc_htb_opt`, `struct tc_fifo_qopt`, `TCA_FQ_*` of `include/uapi/linux/pkt_sched.h`).

use berth_runtime::net::{KernelError, NetError, Netlink};
use netlink_packet_core::{DefaultNla, NLM_F_CREATE, NLM_F_REPLACE, Nla};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    tc::{TcAttribute, TcHandle, TcMessage, TcOption, TcStats2},
};

/// `TCA_OPTIONS` (rtnetlink tc attribute).
const TCA_OPTIONS: u16 = 2;
// enum { TCA_HTB_UNSPEC, TCA_HTB_PARMS, TCA_HTB_INIT, TCA_HTB_CTAB, TCA_HTB_RTAB,
//        TCA_HTB_DIRECT_QLEN, TCA_HTB_RATE64, TCA_HTB_CEIL64, ... }
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_DIRECT_QLEN: u16 = 5;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
const TC_HTB_PROTOVER: u32 = 3;
const TC_LINKLAYER_ETHERNET: u8 = 1;
// enum { TCA_FQ_UNSPEC, TCA_FQ_PLIMIT, TCA_FQ_FLOW_PLIMIT, TCA_FQ_QUANTUM,
//        TCA_FQ_INITIAL_QUANTUM, TCA_FQ_RATE_ENABLE, TCA_FQ_FLOW_DEFAULT_RATE,
//        TCA_FQ_FLOW_MAX_RATE, TCA_FQ_BUCKETS_LOG, TCA_FQ_FLOW_REFILL_DELAY,
//        TCA_FQ_ORPHAN_MASK, TCA_FQ_LOW_RATE_THRESHOLD, TCA_FQ_CE_THRESHOLD,
//        TCA_FQ_TIMER_SLACK, TCA_FQ_HORIZON, TCA_FQ_HORIZON_DROP, ... }
const TCA_FQ_PLIMIT: u16 = 1;
const TCA_FQ_FLOW_PLIMIT: u16 = 2;
const TCA_FQ_HORIZON: u16 = 14;
const TCA_FQ_HORIZON_DROP: u16 = 15;
/// Kernel scheduler ticks are 64 ns (`PSCHED_SHIFT` 6).
const PSCHED_TICK_NS: u128 = 64;

pub fn handle(major: u32, minor: u32) -> u32 {
    major << 16 | minor
}

/// Parameters of one HTB class (rates in bytes per second, as HTB takes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtbClass {
    pub rate: u64,
    pub ceil: u64,
    /// Bytes that may be sent at once above `rate` / `ceil`.
    pub burst: u64,
    pub quantum: u32,
    /// Lower is served first among classes that may send.
    pub prio: u32,
}

/// Options of the EDT backend's root sch_fq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FqParams {
    /// Packets in the whole qdisc.
    pub limit: u32,
    /// Packets per flow (fq's default of 100 would drop what EDT delays: every packet of a
    /// shaped flow waits in its flow queue).
    pub flow_limit: u32,
    /// fq's own horizon, µs: packets stamped later than this are dropped (`horizon_drop`)
    /// or have their time capped.
    pub horizon_us: u32,
    pub horizon_drop: bool,
}

fn fq_options(p: &FqParams) -> Vec<TcOption> {
    let u32_nla =
        |kind: u16, v: u32| TcOption::Other(DefaultNla::new(kind, v.to_ne_bytes().to_vec()));
    vec![
        u32_nla(TCA_FQ_PLIMIT, p.limit),
        u32_nla(TCA_FQ_FLOW_PLIMIT, p.flow_limit),
        u32_nla(TCA_FQ_HORIZON, p.horizon_us),
        // A u8 attribute (nla_get_u8 in fq_change).
        TcOption::Other(DefaultNla::new(
            TCA_FQ_HORIZON_DROP,
            vec![u8::from(p.horizon_drop)],
        )),
    ]
}

/// Replaces the root qdisc of `ifindex` with an fq `major:` (EDT pacing), or changes the
/// options of the one there.
pub fn set_root_fq(
    nl: &mut Netlink,
    ifindex: u32,
    ifname: &str,
    major: u32,
    p: &FqParams,
) -> Result<(), NetError> {
    let mut m = tc_msg(ifindex, handle(major, 0), u32::MAX);
    m.attributes.push(TcAttribute::Kind("fq".into()));
    m.attributes.push(TcAttribute::Options(fq_options(p)));
    nl.request(
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_CREATE | NLM_F_REPLACE,
    )?
    .map_err(|e| fail(nl, "set root fq qdisc on", ifname.to_owned(), e))
}

/// The kind (`htb`, `fq`) of the root qdisc of `ifindex` when its handle is `major:`.
pub fn root_kind(nl: &mut Netlink, ifindex: u32, major: u32) -> Result<Option<String>, NetError> {
    Ok(qdiscs(nl, ifindex)?
        .into_iter()
        .find(|q| q.parent == u32::MAX && q.handle == handle(major, 0))
        .map(|q| q.kind))
}

/// A class or qdisc as the kernel reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcObject {
    pub handle: u32,
    pub parent: u32,
    pub kind: String,
    /// HTB classes: (rate, ceil) in bytes per second and burst in bytes.
    pub htb: Option<(u64, u64, u64)>,
    pub bytes: u64,
    pub packets: u64,
    pub drops: u64,
    pub overlimits: u64,
    pub backlog: u64,
    pub qlen: u64,
}

fn ticks(bytes: u64, rate: u64) -> u32 {
    let t = u128::from(bytes) * 1_000_000_000 / u128::from(rate.max(1)) / PSCHED_TICK_NS;
    u32::try_from(t).unwrap_or(u32::MAX)
}

fn ratespec(rate: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = TC_LINKLAYER_ETHERNET;
    // cell_align -1, as tc sets it (only meaningful with a rate table).
    b[4..6].copy_from_slice(&(-1i16).to_ne_bytes());
    b[8..12].copy_from_slice(&u32::try_from(rate).unwrap_or(u32::MAX).to_ne_bytes());
    b
}

fn htb_class_options(c: &HtbClass) -> Vec<TcOption> {
    let mut opt = Vec::with_capacity(44);
    opt.extend_from_slice(&ratespec(c.rate));
    opt.extend_from_slice(&ratespec(c.ceil));
    opt.extend_from_slice(&ticks(c.burst, c.rate).to_ne_bytes());
    opt.extend_from_slice(&ticks(c.burst, c.ceil).to_ne_bytes());
    opt.extend_from_slice(&c.quantum.to_ne_bytes());
    opt.extend_from_slice(&0u32.to_ne_bytes()); // level (kernel-computed)
    opt.extend_from_slice(&c.prio.to_ne_bytes());
    let mut out = vec![TcOption::Other(DefaultNla::new(TCA_HTB_PARMS, opt))];
    // Rates of 2^32 bytes/s (34 Gbit/s) and more only fit the 64-bit attributes.
    if c.rate > u64::from(u32::MAX) {
        out.push(TcOption::Other(DefaultNla::new(
            TCA_HTB_RATE64,
            c.rate.to_ne_bytes().to_vec(),
        )));
    }
    if c.ceil > u64::from(u32::MAX) {
        out.push(TcOption::Other(DefaultNla::new(
            TCA_HTB_CEIL64,
            c.ceil.to_ne_bytes().to_vec(),
        )));
    }
    out
}

/// Walks a buffer of netlink attributes: (type without flags, payload).
fn nlas(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_of(b: &[u8]) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(..8)?.try_into().ok()?))
}

/// (rate, ceil, burst) of an HTB class from its `TCA_OPTIONS` payload.
fn parse_htb(options: &[u8]) -> Option<(u64, u64, u64)> {
    let mut parms = None;
    let (mut rate64, mut ceil64) = (None, None);
    for (kind, payload) in nlas(options) {
        match kind {
            TCA_HTB_PARMS => parms = Some(payload),
            TCA_HTB_RATE64 => rate64 = u64_of(payload),
            TCA_HTB_CEIL64 => ceil64 = u64_of(payload),
            _ => {}
        }
    }
    let p = parms?;
    let rate = rate64.unwrap_or(u64::from(u32_at(p, 8)?));
    let ceil = ceil64.unwrap_or(u64::from(u32_at(p, 20)?));
    let buffer_ticks = u128::from(u32_at(p, 24)?);
    let burst = buffer_ticks * PSCHED_TICK_NS * u128::from(rate) / 1_000_000_000;
    Some((rate, ceil, u64::try_from(burst).unwrap_or(u64::MAX)))
}

pub(crate) fn to_object(msg: TcMessage) -> TcObject {
    let mut o = TcObject {
        handle: msg.header.handle.into(),
        parent: msg.header.parent.into(),
        ..Default::default()
    };
    let mut options: Option<Vec<u8>> = None;
    for attr in msg.attributes {
        match attr {
            TcAttribute::Kind(k) => o.kind = k,
            TcAttribute::Options(opts) => {
                // Kinds netlink-packet-route does not know keep TCA_OPTIONS as one raw
                // attribute.
                for opt in opts {
                    if let TcOption::Other(nla) = opt
                        && nla.kind() == TCA_OPTIONS
                    {
                        let mut buf = vec![0u8; nla.value_len()];
                        nla.emit_value(&mut buf);
                        options = Some(buf);
                    }
                }
            }
            TcAttribute::Stats2(stats) => {
                for s in stats {
                    match s {
                        TcStats2::Basic(b) => {
                            o.bytes = b.bytes;
                            o.packets = u64::from(b.packets);
                        }
                        TcStats2::Queue(q) => {
                            o.drops = u64::from(q.drops);
                            o.overlimits = u64::from(q.overlimits);
                            o.backlog = u64::from(q.backlog);
                            o.qlen = u64::from(q.qlen);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if o.kind == "htb"
        && let Some(opts) = options
    {
        o.htb = parse_htb(&opts);
    }
    o
}

/// The namespace named in errors: the shaper works where the CTs' host-side interfaces are.
pub const NS: &str = "the host netns";

fn fail(_nl: &Netlink, op: &'static str, object: String, source: KernelError) -> NetError {
    NetError::Netlink {
        op,
        object,
        ns: NS.to_owned(),
        source,
    }
}

fn tc_msg(ifindex: u32, handle: u32, parent: u32) -> TcMessage {
    let mut m = TcMessage::with_index(ifindex as i32);
    m.header.handle = TcHandle::from(handle);
    m.header.parent = TcHandle::from(parent);
    m
}

fn show(h: u32) -> String {
    format!("{:x}:{:x}", h >> 16, h & 0xffff)
}

/// Every qdisc of `ifindex`.
pub fn qdiscs(nl: &mut Netlink, ifindex: u32) -> Result<Vec<TcObject>, NetError> {
    let msg = TcMessage::with_index(ifindex as i32);
    let replies = nl
        .dump(RouteNetlinkMessage::GetQueueDiscipline(msg))?
        .map_err(|e| fail(nl, "list qdiscs of", format!("#{ifindex}"), e))?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) if q.header.index == ifindex as i32 => {
                Some(to_object(q))
            }
            _ => None,
        })
        .collect())
}

/// Every class of `ifindex` (ENODEV/EINVAL for a vanished interface → empty).
pub fn classes(nl: &mut Netlink, ifindex: u32) -> Result<Vec<TcObject>, NetError> {
    let msg = TcMessage::with_index(ifindex as i32);
    let replies = match nl.dump(RouteNetlinkMessage::GetTrafficClass(msg))? {
        Ok(r) => r,
        Err(e) if e.errno == libc::ENODEV => return Ok(Vec::new()),
        Err(e) => return Err(fail(nl, "list classes of", format!("#{ifindex}"), e)),
    };
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficClass(c) if c.header.index == ifindex as i32 => {
                Some(to_object(c))
            }
            _ => None,
        })
        .collect())
}

/// The root qdisc when it is an HTB with handle `major:`.
pub fn root_htb(nl: &mut Netlink, ifindex: u32, major: u32) -> Result<bool, NetError> {
    Ok(qdiscs(nl, ifindex)?
        .iter()
        .any(|q| q.parent == u32::MAX && q.kind == "htb" && q.handle == handle(major, 0)))
}

/// Replaces the root qdisc of `ifindex` with an HTB `major:` whose unclassified traffic goes
/// to `default_minor` (or the direct queue when that class does not exist).
pub fn add_root_htb(
    nl: &mut Netlink,
    ifindex: u32,
    ifname: &str,
    major: u32,
    default_minor: u32,
    direct_qlen: u32,
) -> Result<(), NetError> {
    let mut m = tc_msg(ifindex, handle(major, 0), u32::MAX);
    let mut glob = Vec::with_capacity(20);
    for v in [TC_HTB_PROTOVER, 10, default_minor, 0, 0] {
        glob.extend_from_slice(&v.to_ne_bytes());
    }
    m.attributes.push(TcAttribute::Kind("htb".into()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::Other(DefaultNla::new(TCA_HTB_INIT, glob)),
        TcOption::Other(DefaultNla::new(
            TCA_HTB_DIRECT_QLEN,
            direct_qlen.to_ne_bytes().to_vec(),
        )),
    ]));
    nl.request(
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_CREATE | NLM_F_REPLACE,
    )?
    .map_err(|e| fail(nl, "add root HTB qdisc on", ifname.to_owned(), e))
}

/// Deletes the root qdisc of `ifindex` (the interface falls back to its default). A missing
/// qdisc or interface is success.
pub fn del_root(nl: &mut Netlink, ifindex: u32, ifname: &str) -> Result<(), NetError> {
    let m = tc_msg(ifindex, 0, u32::MAX);
    match nl.request(RouteNetlinkMessage::DelQueueDiscipline(m), 0)? {
        Ok(()) => Ok(()),
        // ENOENT: no root qdisc of ours; EINVAL: the default qdisc (cannot be deleted, so
        // nothing of ours is there); ENODEV: the interface is gone.
        Err(e) if [libc::ENOENT, libc::EINVAL, libc::ENODEV].contains(&e.errno) => Ok(()),
        Err(e) => Err(fail(nl, "delete root qdisc of", ifname.to_owned(), e)),
    }
}

/// Creates or changes (in place, keeping its queue) an HTB class.
pub fn set_htb_class(
    nl: &mut Netlink,
    ifindex: u32,
    ifname: &str,
    classid: u32,
    parent: u32,
    c: &HtbClass,
) -> Result<(), NetError> {
    let mut m = tc_msg(ifindex, classid, parent);
    m.attributes.push(TcAttribute::Kind("htb".into()));
    m.attributes
        .push(TcAttribute::Options(htb_class_options(c)));
    nl.request(RouteNetlinkMessage::NewTrafficClass(m), NLM_F_CREATE)?
        .map_err(|e| {
            fail(
                nl,
                "set HTB class",
                format!("{} on {ifname}", show(classid)),
                e,
            )
        })
}

pub fn del_class(
    nl: &mut Netlink,
    ifindex: u32,
    ifname: &str,
    classid: u32,
) -> Result<(), NetError> {
    let m = tc_msg(ifindex, classid, 0);
    match nl.request(RouteNetlinkMessage::DelTrafficClass(m), 0)? {
        Ok(()) => Ok(()),
        Err(e) if [libc::ENOENT, libc::ENODEV].contains(&e.errno) => Ok(()),
        Err(e) => Err(fail(
            nl,
            "delete HTB class",
            format!("{} on {ifname}", show(classid)),
            e,
        )),
    }
}

/// Puts a `bfifo` (limit in bytes) or `pfifo` (limit in packets) under a leaf class, or
/// changes its limit.
pub fn set_fifo(
    nl: &mut Netlink,
    ifindex: u32,
    ifname: &str,
    parent: u32,
    handle_major: u32,
    kind: &str,
    limit: u32,
) -> Result<(), NetError> {
    let mut m = tc_msg(ifindex, handle(handle_major, 0), parent);
    m.attributes.push(TcAttribute::Kind(kind.into()));
    // struct tc_fifo_qopt { __u32 limit; }: a plain struct, not nested attributes.
    m.attributes.push(TcAttribute::Other(DefaultNla::new(
        TCA_OPTIONS,
        limit.to_ne_bytes().to_vec(),
    )));
    nl.request(
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_CREATE | NLM_F_REPLACE,
    )?
    .map_err(|e| {
        fail(
            nl,
            "set leaf qdisc",
            format!("{kind} under {} on {ifname}", show(parent)),
            e,
        )
    })
}

/// Creates an IFB interface (down), returning its ifindex.
pub fn create_ifb(nl: &mut Netlink, name: &str) -> Result<u32, NetError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Ifb)]));
    let created = nl.link_create(msg, name)?;
    match created {
        Some(l) => Ok(l.header.index),
        None => nl
            .link_by_name(name)?
            .map(|l| l.header.index)
            .ok_or_else(|| NetError::LinkNotFound {
                ifname: name.to_owned(),
                ns: NS.to_owned(),
            }),
    }
}

/// The kind (`ifb`, `veth`, …) of the link `ifindex`, `None` when it does not exist.
pub fn link_kind(
    nl: &mut Netlink,
    ifindex: u32,
) -> Result<Option<(String, String, u32)>, NetError> {
    let Some(link) = nl.link_by_index(ifindex)? else {
        return Ok(None);
    };
    let mut name = String::new();
    let mut kind = String::new();
    let mut mtu = 0;
    for a in link.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n,
            LinkAttribute::Mtu(m) => mtu = m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        kind = k.to_string();
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Some((name, kind, mtu)))
}

/// Deletes the link `ifindex`; a missing one is success.
pub fn del_link_index(nl: &mut Netlink, ifindex: u32, what: &str) -> Result<(), NetError> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    match nl.request(RouteNetlinkMessage::DelLink(msg), 0)? {
        Ok(()) => Ok(()),
        Err(e) if e.errno == libc::ENODEV => Ok(()),
        Err(e) => Err(fail(nl, "delete interface", what.to_owned(), e)),
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable;

    use super::*;

    #[test]
    fn htb_options_round_trip() {
        let c = HtbClass {
            rate: 1_250_000,
            ceil: 2_500_000,
            burst: 16384,
            quantum: 1600,
            prio: 1,
        };
        let opts = htb_class_options(&c);
        let mut buf = Vec::new();
        for o in &opts {
            let mut b = vec![0u8; o.buffer_len()];
            o.emit(&mut b);
            buf.extend_from_slice(&b);
        }
        let (rate, ceil, burst) = parse_htb(&buf).unwrap();
        assert_eq!((rate, ceil), (1_250_000, 2_500_000));
        // Ticks are 64 ns: the burst comes back within one tick's worth of bytes.
        assert!(burst.abs_diff(16384) <= 1, "{burst}");
    }

    #[test]
    fn fq_options_are_the_uapi_attributes() {
        let opts = fq_options(&FqParams {
            limit: 20_000,
            flow_limit: 10_000,
            horizon_us: 3_000_000,
            horizon_drop: true,
        });
        let mut buf = Vec::new();
        for o in &opts {
            let mut b = vec![0u8; o.buffer_len()];
            o.emit(&mut b);
            buf.extend_from_slice(&b);
        }
        let got: Vec<(u16, Vec<u8>)> = nlas(&buf)
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 20_000u32.to_ne_bytes().to_vec()),
                (2, 10_000u32.to_ne_bytes().to_vec()),
                (14, 3_000_000u32.to_ne_bytes().to_vec()),
                (15, vec![1]),
            ]
        );
    }

    #[test]
    fn rates_above_u32_use_rate64() {
        let c = HtbClass {
            rate: 5_000_000_000,
            ceil: 5_000_000_000,
            burst: 1 << 20,
            quantum: 200_000,
            prio: 0,
        };
        let opts = htb_class_options(&c);
        assert_eq!(opts.len(), 3);
        let mut buf = Vec::new();
        for o in &opts {
            let mut b = vec![0u8; o.buffer_len()];
            o.emit(&mut b);
            buf.extend_from_slice(&b);
        }
        assert_eq!(parse_htb(&buf).unwrap().0, 5_000_000_000);
    }
}
