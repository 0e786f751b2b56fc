use berth_runtime::Ctid;
use berth_runtime::config::{CtConfig, Host};
use berth_runtime::transfer_quota::{
    Bytes, Count, HardAction, QuotaChange, QuotaConfig, parse_throttle,
};

use super::store::{QuotaStore, backoff_secs};
use super::*;
use crate::billing::{
    Baseline, BillingAnchor, CtInfo, CtReading, Family, Ledger, LedgerOptions, Reading,
};

fn quota(soft: u64, hard: Option<u64>) -> QuotaConfig {
    QuotaChange {
        transfer: Some(Some(Bytes(soft))),
        throttle: Some(parse_throttle("t", "1mbit").unwrap()),
        hard: Some(hard.map(Bytes)),
        hard_action: Some(HardAction::Cut),
        notify: Some(vec![50, 80, 100]),
        webhook: Some(Some("http://127.0.0.1:9/hook".into())),
        ..QuotaChange::default()
    }
    .merge(&QuotaConfig::default())
    .unwrap()
}

#[test]
fn thresholds_and_states() {
    let l = Limits::of(&quota(1000, Some(1500)), 0).unwrap();
    let st = |u| evaluate(&l, u);
    assert_eq!(st(0).state, State::Normal);
    assert_eq!(st(499).state, State::Normal);
    assert!(st(499).crossed.is_empty());
    assert_eq!(st(500).state, State::Warned);
    assert_eq!(st(500).crossed, [50]);
    assert_eq!(st(999).crossed, [50, 80]);
    assert_eq!(st(1000).state, State::Throttled);
    assert_eq!(st(1000).crossed, [50, 80, 100]);
    assert_eq!(st(1499).state, State::Throttled);
    assert_eq!(st(1500).state, State::Cut);
    // Top-ups move both limits.
    let t = Limits::of(&quota(1000, Some(1500)), 1000).unwrap();
    assert_eq!(evaluate(&t, 1500).state, State::Warned);
    assert_eq!(evaluate(&t, 2000).state, State::Throttled);
    // hard_action none: the hard limit only notifies through the state it leaves.
    let mut q = quota(1000, Some(1500));
    q.hard_action = Some(HardAction::None);
    assert_eq!(
        evaluate(&Limits::of(&q, 0).unwrap(), 9999).state,
        State::Throttled
    );
    q.hard_action = Some(HardAction::Suspend);
    assert_eq!(
        evaluate(&Limits::of(&q, 0).unwrap(), 1500).state,
        State::Suspended
    );
    // No throttle: over the soft limit is a warning.
    q.throttle_rate_in = None;
    q.throttle_rate_out = None;
    q.soft_action = None;
    q.hard = None;
    assert_eq!(
        evaluate(&Limits::of(&q, 0).unwrap(), 5000).state,
        State::Warned
    );
    // Events: every crossed threshold, and the change of state.
    let e = events(Some(State::Normal), &st(1000));
    assert_eq!(
        e,
        [
            "threshold_50",
            "threshold_80",
            "threshold_100",
            "state_throttled"
        ]
    );
    assert_eq!(events(Some(State::Throttled), &st(1000)).len(), 3);
    assert_eq!(events(Some(State::Cut), &st(0)), ["state_normal"]);
    assert!(events(None, &st(0)).is_empty());
}

#[test]
fn used_bytes_by_count_and_class() {
    use crate::billing::{Counter, CounterKey, Direction};
    let k = |d, c| CounterKey::new(d, c, Family::V4);
    let totals = [
        (k(Direction::In, 0), Counter::new(1000, 1)),
        (k(Direction::In, 1), Counter::new(30, 1)),
        (k(Direction::Out, 1), Counter::new(50, 1)),
        (k(Direction::Out, 2), Counter::new(7, 1)),
    ]
    .into_iter()
    .collect();
    let mut q = quota(1, None);
    assert_eq!(used_bytes(&q, &totals), 57, "out, classes but 0");
    q.count = Some(Count::In);
    assert_eq!(used_bytes(&q, &totals), 30);
    q.count = Some(Count::Both);
    assert_eq!(used_bytes(&q, &totals), 87);
    q.count = Some(Count::Max);
    assert_eq!(used_bytes(&q, &totals), 57);
    q.classes = Some(vec![0]);
    assert_eq!(used_bytes(&q, &totals), 1000);
}

#[test]
fn backoff_doubles_and_is_capped() {
    assert_eq!(
        (1..=10).map(backoff_secs).collect::<Vec<_>>(),
        [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]
    );
}

/// 2026-03-01T00:00:00Z.
const MAR1: i64 = 1_772_323_200;
const UUID: &str = "0000002a-0000-4000-8000-000000000000";

struct Node {
    _dir: tempfile::TempDir,
    host: Host,
    ledger_path: std::path::PathBuf,
}

fn node(q: QuotaConfig) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new(Some(dir.path().join("root")), None, None).unwrap();
    host.ensure_dirs().unwrap();
    let mut cfg = CtConfig::new(Ctid::new(42).unwrap(), "busybox".into());
    cfg.uuid = Some(UUID.parse().unwrap());
    cfg.quota = q;
    cfg.save(&host).unwrap();
    let ledger_path = dir.path().join("ledger.db");
    let mut l = Ledger::open(&ledger_path, LedgerOptions::default()).unwrap();
    l.register_ct(&CtInfo::new(
        UUID.into(),
        42,
        BillingAnchor::Day(1),
        "UTC".into(),
        MAR1,
    ))
    .unwrap();
    Node {
        _dir: dir,
        host,
        ledger_path,
    }
}

impl Node {
    /// A ledger tick at `at` with `out` bytes sent in class 1 so far this epoch, then a quota
    /// tick, both on freshly opened connections (as after a restart of berthd).
    fn tick(&self, at: i64, epoch: u64, out: u64) -> QuotaStore {
        let mut l = Ledger::open(&self.ledger_path, LedgerOptions::default()).unwrap();
        use crate::billing::{Counter, CounterKey, Direction};
        l.tick(&[CtReading {
            uuid: UUID.into(),
            reading: Reading {
                at,
                epoch,
                counters: [(
                    CounterKey::new(Direction::Out, 1, Family::V4),
                    Counter::new(out, out / 1000 + 1),
                )]
                .into_iter()
                .collect(),
            },
            first: Baseline::Zero,
        }])
        .unwrap();
        let mut s = QuotaStore::open(&self.ledger_path).unwrap();
        // The enforcement is the datapath's (tested on its own): recorded here.
        let mut applied = Vec::new();
        let mut rec = |ctid: Ctid, e: &enforce::Enforcement| {
            applied.push((ctid, *e));
            Ok(())
        };
        engine::tick(&mut s, &l, &self.host, &mut rec, at).unwrap();
        // Every tick enforces the one CT: its state, or once the lift after its quota went.
        assert_eq!(applied.len(), 1, "{applied:?}");
        let want = match s.state(UUID).unwrap() {
            Some(st) => enforcement(
                &CtConfig::load(&self.host, Ctid::new(42).unwrap())
                    .unwrap()
                    .quota,
                st.state,
            ),
            None => enforce::Enforcement::Normal,
        };
        assert_eq!(applied[0].1, want);
        s
    }
}

fn keys(s: &QuotaStore) -> Vec<String> {
    s.events(UUID)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

#[test]
fn state_persists_across_reopen_outbox_is_idempotent_and_resets_each_period() {
    let n = node(quota(10_000, Some(20_000)));
    let t0 = MAR1 + 3600;
    let s = n.tick(t0, 1, 1000);
    assert_eq!(s.state(UUID).unwrap().unwrap().state, State::Normal);
    assert!(keys(&s).is_empty());
    drop(s);
    let s = n.tick(t0 + 30, 1, 6000);
    let st = s.state(UUID).unwrap().unwrap();
    assert_eq!(
        (st.state, st.used, st.period.as_str()),
        (State::Warned, 6000, "2026-03")
    );
    assert_eq!(
        keys(&s),
        [
            format!("{UUID}:2026-03:threshold_50"),
            format!("{UUID}:2026-03:state_warned")
        ]
    );
    // The same state again (a restart between): nothing new is queued.
    drop(s);
    let s = n.tick(t0 + 60, 1, 7000);
    assert_eq!(keys(&s).len(), 2);
    assert_eq!(s.state(UUID).unwrap().unwrap().since, t0 + 30);
    let s = n.tick(t0 + 90, 1, 10_000);
    assert_eq!(s.state(UUID).unwrap().unwrap().state, State::Throttled);
    assert_eq!(
        s.state(UUID).unwrap().unwrap().enforced.as_deref(),
        Some("throttle")
    );
    assert_eq!(keys(&s).len(), 5, "{:?}", keys(&s));
    let s = n.tick(t0 + 120, 1, 25_000);
    assert_eq!(s.state(UUID).unwrap().unwrap().state, State::Cut);
    assert_eq!(keys(&s).len(), 6);
    // A top-up of this period lifts the cut back to throttled (used 25 000 of soft 20 000,
    // hard 30 000); the events already sent are not sent again.
    let mut s = QuotaStore::open(&n.ledger_path).unwrap();
    assert_eq!(s.add_topup(UUID, MAR1, 10_000).unwrap(), 10_000);
    let s = n.tick(t0 + 150, 1, 25_000);
    let st = s.state(UUID).unwrap().unwrap();
    assert_eq!(
        (st.state, st.soft, st.hard),
        (State::Throttled, 20_000, Some(30_000))
    );
    // state_throttled was already queued this period: the key makes it once.
    assert_eq!(keys(&s).len(), 6);
    // Delivery: marked delivered once, never due again; a failure is retried later.
    let mut s = QuotaStore::open(&n.ledger_path).unwrap();
    let due = s.due(t0 + 150, 100).unwrap();
    assert_eq!(due.len(), 6);
    assert!(due[0].body.contains(UUID) && due[0].body.contains("\"ctid\":42"));
    s.delivered(&due[0].key, t0 + 151).unwrap();
    s.failed(&due[1].key, t0 + 151, "connection refused")
        .unwrap();
    assert_eq!(s.due(t0 + 151, 100).unwrap().len(), 4);
    assert_eq!(s.due(t0 + 152, 100).unwrap().len(), 5);
    assert_eq!(s.backlog().unwrap(), 5);
    let sum = s.outbox_summary(UUID).unwrap();
    assert_eq!((sum.delivered, sum.pending), (1, 5));
    assert_eq!(sum.last_error.unwrap().2, "connection refused");
    // The next period (April 1, UTC): the state resets to normal, top-ups are per period,
    // and the change is an event of the new period.
    let apr1 = MAR1 + 31 * 86400;
    let s = n.tick(apr1 + 600, 1, 25_500);
    let st = s.state(UUID).unwrap().unwrap();
    assert_eq!(
        (st.period.as_str(), st.state, st.used),
        ("2026-04", State::Normal, 500)
    );
    assert_eq!(st.soft, 10_000);
    assert!(keys(&s).contains(&format!("{UUID}:2026-04:state_normal")));
    // Removing the quota lifts and forgets the state.
    let mut cfg = CtConfig::load(&n.host, Ctid::new(42).unwrap()).unwrap();
    cfg.quota = QuotaConfig::default();
    cfg.save(&n.host).unwrap();
    let s = n.tick(apr1 + 630, 1, 25_600);
    assert!(s.state(UUID).unwrap().is_none());
}

#[test]
fn read_only_without_tables_is_empty_and_a_missing_ledger_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.db");
    drop(Ledger::open(&p, LedgerOptions::default()).unwrap());
    let s = QuotaStore::open_read_only(&p).unwrap();
    assert!(s.states().unwrap().is_empty());
    assert_eq!(s.backlog().unwrap(), 0);
    let e = QuotaStore::open(&dir.path().join("nope.db"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope.db"), "{e}");
}

fn set_webhook(n: &Node, url: Option<&str>) {
    let mut cfg = CtConfig::load(&n.host, Ctid::new(42).unwrap()).unwrap();
    cfg.quota.webhook = url.map(str::to_string);
    cfg.save(&n.host).unwrap();
}

#[test]
fn pending_events_follow_the_current_webhook_and_are_abandoned_without_one() {
    let n = node(quota(10_000, Some(20_000)));
    let t0 = MAR1 + 3600;
    drop(n.tick(t0, 1, 1000));
    // threshold_50, threshold_80, threshold_100, state_throttled, queued for :9.
    let mut s = n.tick(t0 + 30, 1, 10_000);
    let due = s.due(t0 + 30, 100).unwrap();
    assert_eq!(due.len(), 4);
    assert!(due.iter().all(|p| p.url == "http://127.0.0.1:9/hook"));
    assert_eq!((due[0].uuid.as_str(), due[0].ctid), (UUID, 42));
    s.delivered(&due[0].key, t0 + 31).unwrap();
    // A failure puts the next one into its backoff.
    s.failed(&due[1].key, t0 + 31, "connection refused")
        .unwrap();
    assert_eq!(s.due(t0 + 31, 100).unwrap().len(), 2);

    // Unchanged webhook: nothing moves, the backoff holds.
    assert_eq!(
        webhook::retarget_all(&mut s, &n.host, t0 + 31).unwrap(),
        (0, 0)
    );
    assert_eq!(s.due(t0 + 31, 100).unwrap().len(), 2);
    // The hoster fixes the URL: every pending event goes there, the failed one at once.
    set_webhook(&n, Some("https://panel.example/new"));
    assert_eq!(
        webhook::retarget_all(&mut s, &n.host, t0 + 31).unwrap(),
        (3, 0)
    );
    let due = s.due(t0 + 31, 100).unwrap();
    assert_eq!(due.len(), 3);
    assert!(due.iter().all(|p| p.url == "https://panel.example/new"));
    // The delivered one is not touched (nor sent again).
    assert_eq!(s.backlog().unwrap(), 3);
    s.delivered(&due[0].key, t0 + 32).unwrap();

    // The webhook is removed: the two left are abandoned with the reason, not pending, not
    // delivered, not failing, never due again.
    set_webhook(&n, None);
    assert_eq!(
        webhook::retarget_all(&mut s, &n.host, t0 + 33).unwrap(),
        (0, 2)
    );
    assert!(s.due(t0 + 9999, 100).unwrap().is_empty());
    assert_eq!((s.backlog().unwrap(), s.failing().unwrap()), (0, 0));
    let ro = QuotaStore::open_read_only(&n.ledger_path).unwrap();
    let sum = ro.outbox_summary(UUID).unwrap();
    assert_eq!((sum.delivered, sum.pending, sum.abandoned), (2, 0, 2));
    assert!(sum.last_error.is_none());
    let (key, reason) = sum.last_abandoned.unwrap();
    assert!(key.starts_with(UUID), "{key}");
    assert_eq!(reason, "abandoned: CT 42 has no quota webhook any more");
    // A webhook set again later does not resurrect them.
    set_webhook(&n, Some("http://127.0.0.1:9/hook"));
    assert_eq!(
        webhook::retarget_all(&mut s, &n.host, t0 + 34).unwrap(),
        (0, 0)
    );
    assert_eq!(s.backlog().unwrap(), 0);

    // The CT destroyed with events pending: abandoned as gone.
    let s = n.tick(t0 + 60, 1, 20_000);
    drop(s);
    let mut s = QuotaStore::open(&n.ledger_path).unwrap();
    assert_eq!(s.backlog().unwrap(), 1, "{:?}", keys(&s));
    std::fs::remove_file(n.host.conf_path(Ctid::new(42).unwrap())).unwrap();
    assert_eq!(
        webhook::retarget_all(&mut s, &n.host, t0 + 61).unwrap(),
        (0, 1)
    );
    let sum = s.outbox_summary(UUID).unwrap();
    assert_eq!(sum.abandoned, 3);
    assert_eq!(
        sum.last_abandoned.unwrap().1,
        "abandoned: CT 42 no longer exists"
    );
}

#[test]
fn an_outbox_from_before_abandoned_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.db");
    drop(Ledger::open(&p, LedgerOptions::default()).unwrap());
    let c = rusqlite::Connection::open(&p).unwrap();
    c.execute_batch(
        "CREATE TABLE quota_state (uuid TEXT PRIMARY KEY, ctid INTEGER NOT NULL, period TEXT NOT NULL, period_start INTEGER NOT NULL, period_end INTEGER NOT NULL, state TEXT NOT NULL, used INTEGER NOT NULL, soft INTEGER NOT NULL, hard INTEGER, since INTEGER NOT NULL, updated INTEGER NOT NULL, enforced TEXT, enforce_error TEXT);
         CREATE TABLE quota_topup (uuid TEXT NOT NULL, period_start INTEGER NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY (uuid, period_start)) WITHOUT ROWID;
         CREATE TABLE quota_outbox (key TEXT PRIMARY KEY, uuid TEXT NOT NULL, ctid INTEGER NOT NULL, event TEXT NOT NULL, url TEXT, body TEXT NOT NULL, created INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt INTEGER NOT NULL, delivered INTEGER, last_error TEXT);
         INSERT INTO quota_outbox (key, uuid, ctid, event, url, body, created, next_attempt) VALUES ('k', 'u', 1, 'e', 'http://x/', '{}', 1, 1);",
    )
    .unwrap();
    drop(c);
    // The CLI reads the old outbox before berthd migrated it.
    let ro = QuotaStore::open_read_only(&p).unwrap();
    assert_eq!(ro.backlog().unwrap(), 1);
    assert_eq!(ro.outbox_summary("u").unwrap().abandoned, 0);
    drop(ro);
    let s = QuotaStore::open(&p).unwrap();
    assert_eq!(s.due(5, 10).unwrap().len(), 1);
    drop(s);
    // Opening again finds the column and adds nothing.
    let s = QuotaStore::open(&p).unwrap();
    assert_eq!(s.backlog().unwrap(), 1);
}
