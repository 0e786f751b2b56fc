//! Read-only verbs and readers never change the kernel's eBPF state: on an empty or absent pin
//! directory they report zeros and create nothing, and the fds a reader opens refuse writes.

use std::path::Path;

use anyhow::{Result, ensure};
use aya::maps::{Array, MapData};
use berth::bpf::{Access, open_map};
use berth::datapath::{Datapath, DatapathView};
use berth_common::map_names;
use berth_tests::ct::TestHost;
use berth_tests::datapath::PinDir;

/// The read-only verbs, as a panel or a hoster's script would call them.
const READ_VERBS: &[&[&str]] = &[
    &[
        "list",
        "-a",
        "-o",
        "ctid,traffic.in,traffic.out,packets.in,drops",
    ],
    &["--json", "list", "-a", "-o", "ctid,traffic.in,drops"],
    &["netstat"],
    &["--json", "netstat", "4601"],
    &["netclass", "list"],
    &["--json", "netclass", "list"],
    &["status", "4601"],
    &["--json", "shaper", "status", "4601"],
];

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn read_only_verbs_on_an_absent_or_empty_pin_dir_create_nothing() {
    let h = TestHost::new();
    h.ok(&["create", "4601"]);

    assert!(
        !h.bpffs.exists(),
        "the test's pin dir exists before any verb"
    );
    for verb in READ_VERBS {
        h.ok(verb);
        assert!(
            !h.bpffs.exists(),
            "`berth {}` created the pin dir {}",
            verb.join(" "),
            h.bpffs.display()
        );
    }
    let v = h.list(&["-a", "-o", "ctid,traffic.in,drops"]);
    assert_eq!(v[0]["traffic"]["in_bytes"], 0, "{v:?}");
    assert_eq!(v[0]["traffic"]["drops"], 0, "{v:?}");

    std::fs::create_dir(&h.bpffs).unwrap();
    for verb in READ_VERBS {
        h.ok(verb);
        let left = entries(&h.bpffs);
        assert!(
            left.is_empty(),
            "`berth {}` created {left:?} in the empty pin dir",
            verb.join(" ")
        );
    }
    let rows = h.json(&["netstat"]);
    assert_eq!(rows, serde_json::json!([]), "{rows}");
    std::fs::remove_dir(&h.bpffs).unwrap();
    h.ok(&["destroy", "4601"]);
}

#[test]
fn a_reader_cannot_write_the_maps() -> Result<()> {
    let pin = PinDir::new();
    drop(Datapath::open_or_load(&pin.path)?);
    let maps = pin.path.join("maps");

    let rw: Array<MapData, u32> = open_map(&maps, map_names::SLOT_CTIDS, 4, 4, Access::ReadWrite)?;
    let mut ro: Array<MapData, u32> =
        open_map(&maps, map_names::SLOT_CTIDS, 4, 4, Access::ReadOnly)?;
    let before = rw.get(&0, 0)?;
    let denied = ro.set(0, 4242, 0);
    ensure!(denied.is_err(), "a read-only fd wrote SLOT_CTIDS[0]");
    ensure!(rw.get(&0, 0)? == before, "SLOT_CTIDS[0] changed");
    ensure!(ro.get(&0, 0)? == before, "the read-only fd cannot read");

    let view = DatapathView::open_pinned(&pin.path)?.expect("pinned datapath");
    ensure!(view.counters()?.is_empty());
    ensure!(view.classes()?.is_empty());
    Ok(())
}
