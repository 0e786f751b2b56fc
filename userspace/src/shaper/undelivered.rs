//! Taking dropped traffic back from the bill (see `berth_common::undelivered`): the seal's
//! key and drop reasons in `SHAPER_SEAL`, and the `kfree_skb` program, attached once per
//! pin directory through a pinned link (`<pin_dir>/shaper/links/undelivered`), so it keeps
//! working without any berth process, like the rest of the datapath.

use std::{fs, io::Read, path::Path};

use aya::{
    EbpfLoader,
    maps::{Array, MapData},
    programs::{BtfTracePoint, links::FdLink},
};
use berth_common::{
    shaper::{map_names, program_names},
    undelivered::{QDISC_CB_DATA_OFFSET, SKB_CB_OFFSET, SKB_DEV_OFFSET, SealConfig},
};
use tracing::{info, warn};

use crate::bpf::{self, Access, BpfError, btf::Btf, io_err, map_err, open_map, programs::MapPins};

/// The tracepoint the program is attached to.
const TRACEPOINT: &str = "kfree_skb";
/// Drop reasons that are drops by tc (a classifier's verdict, an action) or by a qdisc.
const REASON_PREFIXES: [&str; 4] = ["TC_", "QDISC_", "FQ_", "CAKE_"];

/// Why sealing is off on this kernel (`None`: it is on), from its BTF.
fn kernel_check(btf: &Btf) -> Result<[u64; 4], String> {
    let want = [
        ("sk_buff", "dev", SKB_DEV_OFFSET),
        ("sk_buff", "cb", SKB_CB_OFFSET),
        ("qdisc_skb_cb", "data", QDISC_CB_DATA_OFFSET),
    ];
    for (s, m, off) in want {
        match btf.member_offset(s, m) {
            Some(found) if found == off => {}
            found => {
                return Err(format!(
                    "struct {s}.{m} is at {found:?} on this kernel, the programs read it at {off}"
                ));
            }
        }
    }
    let values = btf
        .enum_values("skb_drop_reason")
        .ok_or("the kernel's BTF has no enum skb_drop_reason")?;
    let mut bits = [0u64; 4];
    for (name, value) in values {
        let Some(short) = name.strip_prefix("SKB_DROP_REASON_") else {
            continue;
        };
        if (0..256).contains(&value) && REASON_PREFIXES.iter().any(|p| short.starts_with(p)) {
            bits[value as usize / 64] |= 1 << (value % 64);
        }
    }
    if bits == [0; 4] {
        return Err("no tc or qdisc drop reasons in the kernel's BTF".to_owned());
    }
    Ok(bits)
}

fn random_secret() -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    loop {
        fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        let s = u32::from_le_bytes(b);
        if s != 0 {
            return Ok(s);
        }
    }
}

/// Fills `SHAPER_SEAL` once (the secret stays for the pin directory's life: records sealed
/// before a restart still verify) and attaches the `kfree_skb` program where its link is
/// not pinned yet, or anew when `fresh` (this binary's programs differ). Call with the
/// shaper's pin lock held.
pub(super) fn ensure(shaper_dir: &Path, maps: &[MapPins<'_>], fresh: bool) -> Result<(), BpfError> {
    let maps_dir = shaper_dir.join("maps");
    let mut seal: Array<MapData, SealConfig> = open_map(
        &maps_dir,
        map_names::SEAL,
        4,
        size_of::<SealConfig>(),
        Access::ReadWrite,
    )?;
    let current = seal
        .get(&0, 0)
        .map_err(map_err(map_names::SEAL, &maps_dir, "get"))?;
    let link_pin = shaper_dir.join("links").join("undelivered");
    if current.secret != 0 && link_pin.exists() && !fresh {
        return Ok(());
    }
    let btf = match Btf::kernel() {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "no kernel BTF: traffic the shaper drops stays billed");
            return Ok(());
        }
    };
    let reasons = match kernel_check(&btf) {
        Ok(r) => r,
        Err(why) => {
            warn!(%why, "traffic the shaper drops stays billed");
            return Ok(());
        }
    };
    let secret = if current.secret != 0 {
        current.secret
    } else {
        random_secret().map_err(io_err("reading", Path::new("/dev/urandom")))?
    };
    attach(maps, &link_pin)?;
    seal.set(
        0,
        SealConfig {
            secret,
            _pad: 0,
            reasons,
        },
        0,
    )
    .map_err(map_err(map_names::SEAL, &maps_dir, "set"))?;
    info!(link = %link_pin.display(), "undelivered-traffic accounting attached");
    Ok(())
}

/// Loads the program over the pinned maps, attaches it and pins its link at `link_pin`,
/// replacing an older one. A tracing link cannot be swapped atomically: the old one goes
/// first, so for the moment in between drops are billed rather than taken back twice.
fn attach(maps: &[MapPins<'_>], link_pin: &Path) -> Result<(), BpfError> {
    let name = program_names::UNDELIVERED;
    let perr = |op| bpf::prog_err(name, op);
    let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| BpfError::Program {
        program: name,
        op: "reading the kernel's BTF",
        source: Box::new(aya::programs::ProgramError::Btf(e)),
    })?;
    let mut loader = EbpfLoader::new();
    loader.btf(Some(&kernel_btf));
    for m in maps {
        for map in m.names {
            loader.map_pin_path(map, m.dir.join(map));
        }
    }
    let mut ebpf = loader.load(bpf::object()?).map_err(|e| BpfError::Load {
        maps_dir: maps.first().map(|m| m.dir.to_owned()).unwrap_or_default(),
        source: Box::new(e),
    })?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(aya::programs::ProgramError::NotLoaded)
        .map_err(perr("finding in the object"))?
        .try_into()
        .map_err(perr("typing"))?;
    prog.load(TRACEPOINT, &kernel_btf)
        .map_err(perr("loading (verifier)"))?;
    if link_pin.exists() {
        fs::remove_file(link_pin).map_err(io_err("unpinning", link_pin))?;
    }
    let id = prog.attach().map_err(perr("attaching to kfree_skb"))?;
    let link: FdLink = prog.take_link(id).map_err(perr("taking the link"))?.into();
    link.pin(link_pin).map_err(|source| BpfError::PinProgram {
        program: name,
        path: link_pin.to_owned(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_passes_the_check_with_tc_and_qdisc_reasons_only() {
        let btf = Btf::kernel().unwrap();
        let bits = kernel_check(&btf).unwrap();
        let values = btf.enum_values("skb_drop_reason").unwrap();
        let value = |n: &str| {
            values
                .iter()
                .find(|(name, _)| name == &format!("SKB_DROP_REASON_{n}"))
                .unwrap()
                .1 as usize
        };
        let set = |v: usize| bits[v / 64] & (1 << (v % 64)) != 0;
        for n in ["QDISC_DROP", "TC_EGRESS", "TC_INGRESS", "FQ_HORIZON_LIMIT"] {
            assert!(set(value(n)), "{n}");
        }
        // A packet socket's or the receive backlog's drop is not the shaper's.
        for n in [
            "PACKET_SOCK_ERROR",
            "CPU_BACKLOG",
            "NOT_SPECIFIED",
            "SOCKET_RCVBUFF",
        ] {
            assert!(!set(value(n)), "{n}");
        }
    }
}
