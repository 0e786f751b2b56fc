//! `berth testbed __impair`: loads one copy of `berth_impair` (with maps of its own) from
//! berth's embedded eBPF object, configures it and attaches it to an interface's tc egress as
//! a cls_bpf filter at priority 1 (before any of berth's filters, so a dropped packet is never
//! counted); `--stats` reads the counters of a loaded copy. The testbed's supervisor runs it in
//! the node's network namespace; the stats map is pinned in the supervisor's private bpffs,
//! which goes with the supervisor.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use aya::{
    EbpfLoader,
    maps::{Array, Map, MapData},
    programs::{
        SchedClassifier, TcAttachType,
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use berth_common::impair::{CONFIG_MAP, ImpairConfig, ImpairStats, PROGRAM, STATS_MAP};
use berth_common::map_names;

/// cls_bpf priority: the lowest number runs first.
const PRIORITY: u16 = 1;

pub fn attach(dev: &str, pin: &Path, cfg: ImpairConfig) -> Result<()> {
    let object = berth::bpf::object().context("berth's eBPF object")?;
    let mut loader = EbpfLoader::new();
    // The datapath's maps come with the object: at one entry each they cost nothing.
    for name in map_names::ALL {
        loader.map_max_entries(name, 1);
    }
    let mut ebpf = loader.load(object).context("load berth's eBPF object")?;
    {
        let mut config: Array<_, ImpairConfig> = Array::try_from(
            ebpf.map_mut(CONFIG_MAP)
                .ok_or_else(|| anyhow!("no map {CONFIG_MAP} in the object"))?,
        )?;
        config.set(0, cfg, 0).context("write the impairment")?;
    }
    if let Some(parent) = pin.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    ebpf.map_mut(STATS_MAP)
        .ok_or_else(|| anyhow!("no map {STATS_MAP} in the object"))?
        .pin(pin)
        .with_context(|| format!("pin {}", pin.display()))?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| anyhow!("no program {PROGRAM} in the object"))?
        .try_into()?;
    prog.load().with_context(|| format!("load {PROGRAM}"))?;
    // EEXIST when the qdisc is there already; a real failure shows in the attach.
    let _ = tc::qdisc_add_clsact(dev);
    let id = prog
        .attach_with_options(
            dev,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                ..Default::default()
            }),
        )
        .with_context(|| format!("attach {PROGRAM} to {dev} egress"))?;
    // The filter lives in the qdisc; dropping the handle would delete it.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

pub fn stats(pin: &Path) -> Result<ImpairStats> {
    let data = MapData::from_pin(pin).with_context(|| format!("open {}", pin.display()))?;
    let map: Array<_, ImpairStats> = Array::try_from(Map::Array(data))?;
    Ok(map.get(&0, 0)?)
}
