//! Unit tests on fake v1 and v2 trees in a tempdir: which files get which values.
//! The real kernel's behaviour is tested in berth-tests (tests/tests/cgroups.rs).

use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::*;
use crate::size::Size;

const UNLIMITED_V1: &str = "9223372036854771712\n";

fn ctid(n: u32) -> Ctid {
    Ctid::new(n).unwrap()
}

fn put(dir: &Path, file: &str, content: &str) {
    fs::write(dir.join(file), content).unwrap();
}

fn get(dir: &Path, file: &str) -> String {
    fs::read_to_string(dir.join(file)).unwrap()
}

/// Files the kernel puts into a new v1 cgroup of each controller (the ones berth touches).
fn v1_defaults(c: Controller) -> &'static [(&'static str, &'static str)] {
    match c {
        Controller::Memory => &[
            ("memory.limit_in_bytes", UNLIMITED_V1),
            ("memory.memsw.limit_in_bytes", UNLIMITED_V1),
            ("memory.usage_in_bytes", "0\n"),
            ("memory.memsw.usage_in_bytes", "0\n"),
        ],
        Controller::Cpu => &[
            ("cpu.shares", "1024\n"),
            ("cpu.cfs_period_us", "100000\n"),
            ("cpu.cfs_quota_us", "-1\n"),
        ],
        Controller::Cpuset => &[("cpuset.cpus", "\n"), ("cpuset.mems", "\n")],
        Controller::Pids => &[("pids.max", "max\n"), ("pids.current", "0\n")],
        Controller::Blkio => &[("blkio.bfq.weight", "100\n")],
        Controller::Freezer => &[("freezer.state", "THAWED\n")],
        Controller::Devices => &[
            ("devices.allow", ""),
            ("devices.deny", ""),
            ("devices.list", "a *:* rwm\n"),
        ],
        Controller::Cpuacct => &[("cpuacct.usage", "0\n")],
    }
}

/// A v1 host in a tempdir: cpu and cpuacct co-mounted (as on many distributions), the rest apart.
struct FakeV1 {
    _tmp: TempDir,
    mounts: V1Mounts,
}

impl FakeV1 {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = Vec::new();
        for c in Controller::ALL {
            let dir = match c {
                Controller::Cpu | Controller::Cpuacct => tmp.path().join("cpu,cpuacct"),
                c => tmp.path().join(c.name()),
            };
            fs::create_dir_all(&dir).unwrap();
            m.push((c, dir));
        }
        let cpuset = tmp.path().join("cpuset");
        put(&cpuset, "cpuset.cpus", "0-3\n");
        put(&cpuset, "cpuset.mems", "0\n");
        Self {
            _tmp: tmp,
            mounts: V1Mounts::new(m),
        }
    }

    /// What the kernel does on mkdir: the directory appears with its controller's files.
    fn kernel_mkdir(&self, parent: &str, ct: u32) -> V1Cgroup {
        for (c, mount) in self.mounts.iter() {
            let mut dir = mount.to_path_buf();
            for comp in parent.split('/').chain([ct.to_string().as_str()]) {
                dir.push(comp);
                fs::create_dir_all(&dir).unwrap();
                put(&dir, "cgroup.procs", "");
                for (f, v) in v1_defaults(c) {
                    if !dir.join(f).exists() {
                        put(&dir, f, v);
                    }
                }
            }
        }
        V1Cgroup::with_mounts(self.mounts.clone(), parent, ctid(ct)).unwrap()
    }
}

fn dir(cg: &V1Cgroup, c: Controller) -> PathBuf {
    cg.dir(c).unwrap()
}

#[test]
fn v1_paths_and_join_files() {
    let fake = FakeV1::new();
    let cg = V1Cgroup::with_mounts(fake.mounts.clone(), "berth", ctid(101)).unwrap();
    let mem = fake.mounts.get(Controller::Memory).unwrap();
    assert_eq!(dir(&cg, Controller::Memory), mem.join("berth/101"));
    assert_eq!(dir(&cg, Controller::Cpu), dir(&cg, Controller::Cpuacct));
    let files = cg.join_self_files();
    // 8 controllers, cpu+cpuacct share one directory.
    assert_eq!(files.len(), 7);
    assert!(files.contains(&mem.join("berth/101/tasks")));
    assert!(files.iter().all(|f| f.ends_with("berth/101/tasks")));
    assert!(!cg.exists());
}

#[test]
fn v1_create_copies_cpuset_at_every_level() {
    let fake = FakeV1::new();
    let cg = fake.kernel_mkdir("berth/t", 101);
    cg.create().unwrap();
    let cs = fake.mounts.get(Controller::Cpuset).unwrap();
    for level in ["berth", "berth/t", "berth/t/101"] {
        assert_eq!(get(&cs.join(level), "cpuset.cpus"), "0-3", "{level}");
        assert_eq!(get(&cs.join(level), "cpuset.mems"), "0", "{level}");
    }
    // Idempotent, and a non-empty cpuset is left alone.
    put(&cs.join("berth/t/101"), "cpuset.cpus", "1\n");
    cg.create().unwrap();
    assert_eq!(get(&cs.join("berth/t/101"), "cpuset.cpus"), "1\n");
    assert!(cg.exists());
}

#[test]
fn v1_memory_only_keeps_unlimited_memsw() {
    let fake = FakeV1::new();
    let cg = fake.kernel_mkdir("berth", 101);
    let r = Resources {
        memory: Some(Size::Bytes(512 << 20)),
        ..Default::default()
    };
    let plan = cg.plan(&r).unwrap();
    assert_eq!(plan.len(), 1);
    cg.apply(&r).unwrap();
    let d = dir(&cg, Controller::Memory);
    assert_eq!(get(&d, "memory.limit_in_bytes"), "536870912");
    assert_eq!(get(&d, "memory.memsw.limit_in_bytes"), UNLIMITED_V1);
}

#[test]
fn v1_memory_and_swap_write_memsw_as_sum_in_a_safe_order() {
    let fake = FakeV1::new();
    let cg = fake.kernel_mkdir("berth", 101);
    let d = dir(&cg, Controller::Memory);
    // Lowering from unlimited: memory first, then memsw (memsw ≥ memory at every step).
    let r = Resources {
        memory: Some(Size::Bytes(1 << 30)),
        swap: Some(Size::Bytes(256 << 20)),
        ..Default::default()
    };
    let files: Vec<&str> = cg.plan(&r).unwrap().iter().map(|w| w.file).collect();
    assert_eq!(
        files,
        ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    );
    cg.apply(&r).unwrap();
    assert_eq!(get(&d, "memory.limit_in_bytes"), (1u64 << 30).to_string());
    assert_eq!(
        get(&d, "memory.memsw.limit_in_bytes"),
        ((1u64 << 30) + (256 << 20)).to_string()
    );

    // Raising memory above the current memsw: memsw first; the swap amount (256M) is kept.
    let r = Resources {
        memory: Some(Size::Bytes(2 << 30)),
        ..Default::default()
    };
    let plan = cg.plan(&r).unwrap();
    let files: Vec<&str> = plan.iter().map(|w| w.file).collect();
    assert_eq!(
        files,
        ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    );
    cg.apply(&r).unwrap();
    assert_eq!(get(&d, "memory.limit_in_bytes"), (2u64 << 30).to_string());
    assert_eq!(
        get(&d, "memory.memsw.limit_in_bytes"),
        ((2u64 << 30) + (256 << 20)).to_string()
    );

    // Swap only: memory stays, memsw = memory + new swap.
    cg.apply(&Resources {
        swap: Some(Size::Bytes(0)),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get(&d, "memory.limit_in_bytes"), (2u64 << 30).to_string());
    assert_eq!(
        get(&d, "memory.memsw.limit_in_bytes"),
        (2u64 << 30).to_string()
    );

    // Unlimited memory: both -1, memsw first.
    let r = Resources {
        memory: Some(Size::Unlimited),
        ..Default::default()
    };
    let plan = cg.plan(&r).unwrap();
    assert_eq!(plan[0].file, "memory.memsw.limit_in_bytes");
    cg.apply(&r).unwrap();
    assert_eq!(get(&d, "memory.limit_in_bytes"), "-1");
    assert_eq!(get(&d, "memory.memsw.limit_in_bytes"), "-1");
}

#[test]
fn v1_cpu_pids_and_io_files() {
    let fake = FakeV1::new();
    let cg = fake.kernel_mkdir("berth", 101);
    let cpu = dir(&cg, Controller::Cpu);
    cg.apply(&Resources {
        cpuunits: Some(2000),
        cpulimit: Some(50),
        numproc: Some(100),
        ioweight: Some(500),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get(&cpu, "cpu.shares"), "2048");
    assert_eq!(get(&cpu, "cpu.cfs_period_us"), "100000");
    assert_eq!(get(&cpu, "cpu.cfs_quota_us"), "50000");
    assert_eq!(get(&dir(&cg, Controller::Pids), "pids.max"), "100");
    let blkio = dir(&cg, Controller::Blkio);
    assert_eq!(get(&blkio, "blkio.bfq.weight"), "500");
    assert!(!blkio.join("blkio.weight").exists());

    // cpus caps cpulimit; 0 means unlimited for both.
    cg.apply(&Resources {
        cpulimit: Some(150),
        cpus: Some(1),
        numproc: Some(0),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get(&cpu, "cpu.cfs_quota_us"), "100000");
    assert_eq!(get(&dir(&cg, Controller::Pids), "pids.max"), "max");
    cg.apply(&Resources {
        cpulimit: Some(0),
        cpus: Some(0),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get(&cpu, "cpu.cfs_quota_us"), "-1");

    // With CFQ's file present too, both weights are written.
    put(&blkio, "blkio.weight", "500\n");
    cg.apply(&Resources {
        ioweight: Some(10),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get(&blkio, "blkio.weight"), "10");
    assert_eq!(get(&blkio, "blkio.bfq.weight"), "10");
}

#[test]
fn v1_unsupported_and_invalid_settings_write_nothing() {
    let fake = FakeV1::new();
    let cg = fake.kernel_mkdir("berth", 101);
    let mem = dir(&cg, Controller::Memory);
    let blkio = dir(&cg, Controller::Blkio);
    fs::remove_file(blkio.join("blkio.bfq.weight")).unwrap();
    let e = cg
        .apply(&Resources {
            memory: Some(Size::Bytes(64 << 20)),
            ioweight: Some(100),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("unsupported: --ioweight: neither blkio.weight nor blkio.bfq.weight"),
        "{e}"
    );
    assert_eq!(get(&mem, "memory.limit_in_bytes"), UNLIMITED_V1);

    fs::remove_file(mem.join("memory.memsw.limit_in_bytes")).unwrap();
    let e = cg
        .apply(&Resources {
            memory: Some(Size::Bytes(64 << 20)),
            swap: Some(Size::Bytes(0)),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        e.to_string().starts_with("unsupported: --swap: no memsw"),
        "{e}"
    );
    assert_eq!(get(&mem, "memory.limit_in_bytes"), UNLIMITED_V1);
    // Without memsw, memory alone still works.
    cg.apply(&Resources {
        memory: Some(Size::Bytes(64 << 20)),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        get(&mem, "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );

    let e = cg
        .apply(&Resources {
            numproc: Some(10),
            cpuunits: Some(1),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().starts_with("invalid --cpuunits 1:"), "{e}");
    assert_eq!(get(&dir(&cg, Controller::Pids), "pids.max"), "max\n");
}

#[test]
fn v1_missing_cgroup_and_missing_controller() {
    let fake = FakeV1::new();
    let cg = V1Cgroup::with_mounts(fake.mounts.clone(), "berth", ctid(7)).unwrap();
    let e = cg
        .apply(&Resources {
            numproc: Some(5),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, CgroupError::Missing { .. }), "{e}");
    assert!(
        e.to_string()
            .ends_with("berth/7: the cgroup does not exist"),
        "{e}"
    );
    assert!(matches!(cg.stats(), Err(CgroupError::Missing { .. })));

    let no_pids = V1Mounts::new(
        fake.mounts
            .iter()
            .filter(|(c, _)| *c != Controller::Pids)
            .map(|(c, p)| (c, p.to_path_buf())),
    );
    let cg = V1Cgroup::with_mounts(no_pids, "berth", ctid(7)).unwrap();
    let e = cg
        .apply(&Resources {
            numproc: Some(5),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported: --numproc needs the v1 pids controller, which this host does not mount"
    );
}

#[test]
fn v1_freezer_and_devices() {
    let fake = FakeV1::new();
    let cg = fake.kernel_mkdir("berth", 101);
    assert!(!cg.is_frozen().unwrap());
    cg.freeze().unwrap();
    assert!(cg.is_frozen().unwrap());
    assert_eq!(
        get(&dir(&cg, Controller::Freezer), "freezer.state"),
        "FROZEN"
    );
    cg.thaw().unwrap();
    assert!(!cg.is_frozen().unwrap());

    cg.setup_devices().unwrap();
    let dev = dir(&cg, Controller::Devices);
    // A regular file keeps only the last write: deny-all, then the last allow rule.
    assert_eq!(get(&dev, "devices.deny"), "a");
    assert_eq!(get(&dev, "devices.allow"), "c 136:* rwm");
}

#[test]
fn v1_stats_from_sample_files() {
    let fake = FakeV1::new();
    let cg = fake.kernel_mkdir("berth", 101);
    let mem = dir(&cg, Controller::Memory);
    put(&mem, "memory.usage_in_bytes", "104857600\n");
    put(&mem, "memory.memsw.usage_in_bytes", "110100480\n");
    put(&mem, "memory.limit_in_bytes", "134217728\n");
    put(&mem, "memory.memsw.limit_in_bytes", "201326592\n");
    put(&mem, "memory.failcnt", "10\n");
    put(&mem, "memory.memsw.failcnt", "7\n");
    put(&mem, "memory.max_usage_in_bytes", "120000000\n");
    put(&mem, "memory.memsw.max_usage_in_bytes", "130000000\n");
    put(&mem, "memory.soft_limit_in_bytes", "9223372036854771712\n");
    put(
        &mem,
        "memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    );
    put(
        &mem,
        "memory.stat",
        "cache 1\nrss 2\ninactive_file 3\ntotal_cache 41943040\ntotal_rss 52428800\n\
         total_inactive_file 20971520\ntotal_active_file 1\n",
    );
    let cpu = dir(&cg, Controller::Cpu);
    put(&cpu, "cpu.cfs_quota_us", "50000\n");
    put(
        &cpu,
        "cpu.stat",
        "nr_periods 20\nnr_throttled 19\nthrottled_time 950000000\nnr_bursts 0\nburst_time 0\n",
    );
    put(&cpu, "cpuacct.usage", "1000000000\n");
    put(&cpu, "cpuacct.usage_user", "600000000\n");
    put(&cpu, "cpuacct.usage_sys", "400000000\n");
    let pids = dir(&cg, Controller::Pids);
    put(&pids, "pids.current", "3\n");
    put(&pids, "pids.max", "10\n");
    put(&pids, "pids.events", "max 4\n");
    put(&pids, "pids.peak", "7\n");
    let blkio = dir(&cg, Controller::Blkio);
    put(
        &blkio,
        "blkio.throttle.io_service_bytes_recursive",
        "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 0\n8:0 Discard 0\n8:0 Total 12288\n\
         Total 12288\n",
    );
    put(
        &blkio,
        "blkio.throttle.io_serviced_recursive",
        "8:0 Read 1\n8:0 Write 2\nTotal 3\n",
    );
    put(&dir(&cg, Controller::Freezer), "freezer.state", "FROZEN\n");

    let s = cg.stats().unwrap();
    assert_eq!(
        s,
        Stats {
            numproc: 3,
            numproc_limit: Some(10),
            numproc_failcnt: 4,
            numproc_peak: Some(7),
            memory_usage: 104_857_600,
            memory_limit: Some(134_217_728),
            memory_peak: Some(120_000_000),
            memory_barrier: None,
            memory_failcnt: 17,
            memory_working_set: 104_857_600 - 20_971_520,
            memory_cache: 41_943_040,
            memory_rss: 52_428_800,
            swap_usage: 110_100_480 - 104_857_600,
            swap_limit: Some(201_326_592 - 134_217_728),
            swap_peak: Some(10_000_000),
            oom_kills: 2,
            cpu_usage_ns: 1_000_000_000,
            cpu_user_ns: 600_000_000,
            cpu_system_ns: 400_000_000,
            nr_periods: 20,
            nr_throttled: 19,
            throttled_ns: 950_000_000,
            cpu_quota_us: Some(50_000),
            cpu_period_us: 100_000,
            blkio_read_bytes: 4096,
            blkio_write_bytes: 8192,
            blkio_read_ios: 1,
            blkio_write_ios: 2,
            frozen: true,
        }
    );
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["memory_working_set"], 83_886_080);
    assert_eq!(json["cpu_quota_us"], 50_000);

    // Unlimited shows as None; a garbage file is a parse error naming the file.
    put(&mem, "memory.limit_in_bytes", UNLIMITED_V1);
    put(&cpu, "cpu.cfs_quota_us", "-1\n");
    let s = cg.stats().unwrap();
    assert_eq!(
        (s.memory_limit, s.cpu_quota_us, s.swap_limit),
        (None, None, None)
    );
    put(&mem, "memory.usage_in_bytes", "lots\n");
    let e = cg.stats().unwrap_err().to_string();
    assert!(e.starts_with("parse memory.usage_in_bytes in "), "{e}");
}

#[test]
fn v1_pids_union_over_hierarchies_and_children() {
    let fake = FakeV1::new();
    let cg = fake.kernel_mkdir("berth", 101);
    put(&dir(&cg, Controller::Memory), "cgroup.procs", "10\n11\n");
    put(&dir(&cg, Controller::Pids), "cgroup.procs", "11\n");
    let child = dir(&cg, Controller::Pids).join("init.scope");
    fs::create_dir(&child).unwrap();
    put(&child, "cgroup.procs", "12\n");
    assert_eq!(cg.pids().unwrap(), [10, 11, 12]);
    let e = cg.destroy().unwrap_err();
    assert!(
        e.to_string()
            .contains("3 process(es) still inside (pids [10, 11, 12])"),
        "{e}"
    );
    assert!(cg.exists());
}

#[test]
fn ebusy_message_is_readable() {
    let e = CgroupError::MemoryBelowUsage {
        file: "memory.limit_in_bytes",
        path: PathBuf::from("/sys/fs/cgroup/memory/berth/101"),
        limit: Size::Bytes(1 << 30),
        usage: Size::Bytes(3 << 29),
    };
    assert_eq!(
        e.to_string(),
        "write memory.limit_in_bytes = 1G in /sys/fs/cgroup/memory/berth/101: the CT uses 1536M \
         now and the kernel could not reclaim down to the new limit (Device or resource busy); \
         free memory inside the CT or choose a limit above its usage"
    );
}

/// A unified host in a tempdir, with the files berth touches.
struct FakeV2 {
    tmp: TempDir,
}

const V2_FILES: &[(&str, &str)] = &[
    ("cgroup.procs", ""),
    ("cgroup.controllers", "cpuset cpu io memory pids\n"),
    ("cgroup.subtree_control", ""),
    ("cgroup.freeze", "0\n"),
    ("cgroup.events", "populated 0\nfrozen 0\n"),
    ("memory.max", "max\n"),
    ("memory.swap.max", "max\n"),
    ("cpu.weight", "100\n"),
    ("cpu.max", "max 100000\n"),
    ("pids.max", "max\n"),
    ("io.bfq.weight", "default 100\n"),
];

impl FakeV2 {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        put(
            tmp.path(),
            "cgroup.controllers",
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        );
        put(tmp.path(), "cgroup.subtree_control", "");
        Self { tmp }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn kernel_mkdir(&self, parent: &str, ct: u32) -> V2Cgroup {
        let mut dir = self.root().to_path_buf();
        for comp in parent.split('/').chain([ct.to_string().as_str()]) {
            dir.push(comp);
            fs::create_dir_all(&dir).unwrap();
            for (f, v) in V2_FILES {
                if !dir.join(f).exists() {
                    put(&dir, f, v);
                }
            }
        }
        V2Cgroup::with_mount(self.root(), parent, ctid(ct)).unwrap()
    }
}

#[test]
fn v2_create_enables_controllers_in_ancestors_only() {
    let fake = FakeV2::new();
    let cg = fake.kernel_mkdir("berth", 101);
    cg.create().unwrap();
    // A regular file keeps only the last write; pids is the last wanted controller.
    assert_eq!(get(fake.root(), "cgroup.subtree_control"), "+pids");
    assert_eq!(
        get(&fake.root().join("berth"), "cgroup.subtree_control"),
        "+pids"
    );
    assert_eq!(get(&cg.dir(), "cgroup.subtree_control"), "");
    // Already enabled: nothing is written.
    put(
        fake.root(),
        "cgroup.subtree_control",
        "cpu io memory pids\n",
    );
    cg.create().unwrap();
    assert_eq!(
        get(fake.root(), "cgroup.subtree_control"),
        "cpu io memory pids\n"
    );
    assert_eq!(
        cg.join_self_files(),
        [fake.root().join("berth/101/cgroup.procs")]
    );
}

#[test]
fn v2_files_for_each_setting() {
    let fake = FakeV2::new();
    let cg = fake.kernel_mkdir("berth", 101);
    let d = cg.dir();
    cg.apply(&Resources {
        memory: Some(Size::Bytes(256 << 20)),
        swap: Some(Size::Bytes(128 << 20)),
        cpuunits: Some(500),
        cpulimit: Some(250),
        cpus: Some(2),
        numproc: Some(64),
        ioweight: Some(300),
    })
    .unwrap();
    assert_eq!(get(&d, "memory.max"), (256u64 << 20).to_string());
    assert_eq!(get(&d, "memory.swap.max"), (128u64 << 20).to_string());
    assert_eq!(get(&d, "cpu.weight"), "50");
    assert_eq!(get(&d, "cpu.max"), "200000 100000");
    assert_eq!(get(&d, "pids.max"), "64");
    assert_eq!(get(&d, "io.bfq.weight"), "300");
    assert!(!d.join("io.weight").exists());

    put(&d, "io.weight", "default 100\n");
    cg.apply(&Resources {
        memory: Some(Size::Unlimited),
        swap: Some(Size::Unlimited),
        cpulimit: Some(0),
        cpus: None,
        numproc: Some(0),
        ioweight: Some(1000),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(get(&d, "memory.max"), "max");
    assert_eq!(get(&d, "memory.swap.max"), "max");
    assert_eq!(get(&d, "cpu.max"), "max 100000");
    assert_eq!(get(&d, "pids.max"), "max");
    assert_eq!(get(&d, "io.weight"), "default 1000");
    assert_eq!(get(&d, "io.bfq.weight"), "1000");
}

#[test]
fn v2_unsupported_writes_nothing() {
    let fake = FakeV2::new();
    let cg = fake.kernel_mkdir("berth", 101);
    let d = cg.dir();
    fs::remove_file(d.join("memory.swap.max")).unwrap();
    let e = cg
        .apply(&Resources {
            memory: Some(Size::Bytes(64 << 20)),
            swap: Some(Size::Bytes(0)),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("unsupported: --swap: memory.swap.max is absent in"),
        "{e}"
    );
    assert_eq!(get(&d, "memory.max"), "max\n");
    fs::remove_file(d.join("pids.max")).unwrap();
    let e = cg
        .apply(&Resources {
            numproc: Some(5),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("the pids controller is not enabled for this cgroup"),
        "{e}"
    );
}

#[test]
fn v2_stats_from_sample_files() {
    let fake = FakeV2::new();
    let cg = fake.kernel_mkdir("berth", 101);
    let d = cg.dir();
    put(&d, "pids.current", "5\n");
    put(&d, "pids.max", "max\n");
    put(&d, "pids.events", "max 0\n");
    put(&d, "memory.current", "50000000\n");
    put(&d, "memory.max", "67108864\n");
    put(
        &d,
        "memory.events",
        "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
    );
    put(
        &d,
        "memory.stat",
        "anon 30000000\nfile 20000000\nkernel 1\ninactive_anon 0\nactive_anon 1\n\
         inactive_file 15000000\nactive_file 5000000\n",
    );
    put(&d, "memory.swap.current", "4096\n");
    put(&d, "memory.swap.max", "0\n");
    put(
        &d,
        "cpu.stat",
        "usage_usec 2000000\nuser_usec 1500000\nsystem_usec 500000\nnr_periods 30\n\
         nr_throttled 10\nthrottled_usec 700000\nnr_bursts 0\nburst_usec 0\n",
    );
    put(&d, "cpu.max", "50000 100000\n");
    put(
        &d,
        "io.stat",
        "8:0 rbytes=1000 wbytes=2000 rios=3 wios=4 dbytes=0 dios=0\n",
    );
    put(&d, "cgroup.events", "populated 1\nfrozen 1\n");
    let s = cg.stats().unwrap();
    assert_eq!(
        s,
        Stats {
            numproc: 5,
            numproc_limit: None,
            numproc_failcnt: 0,
            numproc_peak: None,
            memory_usage: 50_000_000,
            memory_limit: Some(67_108_864),
            memory_peak: None,
            memory_barrier: None,
            memory_failcnt: 12,
            memory_working_set: 35_000_000,
            memory_cache: 20_000_000,
            memory_rss: 30_000_000,
            swap_usage: 4096,
            swap_limit: Some(0),
            swap_peak: None,
            oom_kills: 1,
            cpu_usage_ns: 2_000_000_000,
            cpu_user_ns: 1_500_000_000,
            cpu_system_ns: 500_000_000,
            nr_periods: 30,
            nr_throttled: 10,
            throttled_ns: 700_000_000,
            cpu_quota_us: Some(50_000),
            cpu_period_us: 100_000,
            blkio_read_bytes: 1000,
            blkio_write_bytes: 2000,
            blkio_read_ios: 3,
            blkio_write_ios: 4,
            frozen: true,
        }
    );
    assert!(cg.is_frozen().unwrap());
    put(&d, "memory.max", "lots\n");
    let e = cg.stats().unwrap_err().to_string();
    assert!(e.starts_with("parse memory.max in"), "{e}");
}

#[test]
fn hierarchy_open_list_and_remove_parent() {
    let fake = FakeV1::new();
    let hierarchy = Hierarchy::V1(fake.mounts.clone());
    let Cgroup::V1(cg) = hierarchy.open("p", ctid(5)).unwrap() else {
        panic!("expected v1");
    };
    assert!(cg.dir(Controller::Memory).unwrap().ends_with("memory/p/5"));
    fake.kernel_mkdir("p", 5);
    fake.kernel_mkdir("p", 12);
    let mem = fake.mounts.get(Controller::Memory).unwrap();
    fs::create_dir(mem.join("p/not-a-ct")).unwrap();
    assert_eq!(hierarchy.list_ctids("p").unwrap(), [ctid(5), ctid(12)]);
    assert!(hierarchy.list_ctids("absent").unwrap().is_empty());
    // Not empty: kept, no error.
    hierarchy.remove_parent_if_empty("p").unwrap();
    assert!(mem.join("p").exists());
    assert!(hierarchy.open("../etc", ctid(5)).is_err());

    let v2 = FakeV2::new();
    let hierarchy = Hierarchy::V2(v2.root().to_path_buf());
    let missing = hierarchy.open("berth", ctid(9)).unwrap();
    assert!(missing.is_v2() && !missing.exists());
    // Nothing to kill or remove in a cgroup that does not exist.
    missing
        .kill_all(std::time::Duration::from_millis(10))
        .unwrap();
    missing.destroy().unwrap();
    assert!(missing.pids().unwrap().is_empty());
    fs::create_dir(v2.root().join("t")).unwrap();
    hierarchy.remove_parent_if_empty("t").unwrap();
    assert!(!v2.root().join("t").exists());
}

/// `restore_limits` puts back exactly what `save_limits` read, on v1 (memsw order included)
/// and v2 (first lines of multi-line weight files).
#[test]
fn saved_limits_restore_what_was_there() {
    let fake = FakeV1::new();
    let cg = Cgroup::V1(fake.kernel_mkdir("berth", 101));
    let Cgroup::V1(v1) = &cg else { unreachable!() };
    let (mem, cpu) = (dir(v1, Controller::Memory), dir(v1, Controller::Cpu));
    cg.apply(&Resources {
        memory: Some(Size::Bytes(1 << 30)),
        swap: Some(Size::Bytes(256 << 20)),
        ..Default::default()
    })
    .unwrap();
    let files = |d: &Path, names: &[&str]| -> Vec<String> {
        names.iter().map(|f| get(d, f).trim().to_string()).collect()
    };
    let mem_files = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"];
    let cpu_files = ["cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"];
    let before = (files(&mem, &mem_files), files(&cpu, &cpu_files));
    // Raising memory above memsw writes memsw first; the restore must lower it last.
    let change = Resources {
        memory: Some(Size::Bytes(2 << 30)),
        cpuunits: Some(500),
        cpulimit: Some(50),
        ..Default::default()
    };
    let saved = cg.save_limits(&change).unwrap();
    cg.apply(&change).unwrap();
    assert_ne!((files(&mem, &mem_files), files(&cpu, &cpu_files)), before);
    cg.restore_limits(&saved).unwrap();
    assert_eq!((files(&mem, &mem_files), files(&cpu, &cpu_files)), before);
    // Nothing to change, nothing saved.
    assert_eq!(
        cg.save_limits(&Resources::default()).unwrap(),
        SavedLimits::default()
    );

    let fake = FakeV2::new();
    let cg = Cgroup::V2(fake.kernel_mkdir("berth", 102));
    let Cgroup::V2(v2) = &cg else { unreachable!() };
    let d = v2.dir();
    put(&d, "io.weight", "default 100\n8:0 300\n");
    let change = Resources {
        memory: Some(Size::Bytes(256 << 20)),
        numproc: Some(64),
        ioweight: Some(500),
        ..Default::default()
    };
    let saved = cg.save_limits(&change).unwrap();
    cg.apply(&change).unwrap();
    assert_eq!(get(&d, "io.weight"), "default 500");
    cg.restore_limits(&saved).unwrap();
    assert_eq!(get(&d, "memory.max"), "max");
    assert_eq!(get(&d, "pids.max"), "max");
    assert_eq!(get(&d, "io.weight"), "default 100");
    assert_eq!(get(&d, "io.bfq.weight"), "default 100");
}
