//! CT state changes for `GET /v1/events` (server-sent events): those the API's own
//! operations make, as they finish, and — while anyone listens — those berthd notices on its
//! own (a CLI `berth start`, a CT whose init died), by comparing each CT's state and config
//! file every [`WATCH_EVERY`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_runtime::Ctid;
use berth_runtime::config::Host;
use berth_runtime::container;
use serde::Serialize;
use tokio::sync::broadcast;

/// How often berthd compares the CTs' states while a client is subscribed.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// `created`, `started`, `stopped`, `restarted`, `suspended`, `resumed`, `destroyed`,
    /// `settings_changed`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ctid: Ctid,
    /// The CT's state after the change (`null` once destroyed).
    pub status: Option<String>,
    /// `api` (an operation of this API) or `host` (noticed by berthd).
    pub source: &'static str,
    /// The API's operation id, for `api` events.
    pub operation: Option<String>,
    /// Unix seconds.
    pub time: i64,
}

/// What berthd last knew of one CT: its state and its config's modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    state: String,
    conf_mtime: Option<SystemTime>,
}

#[derive(Default)]
struct Watch {
    /// `None` while nobody listens (nothing is read then).
    known: Option<BTreeMap<Ctid, Seen>>,
    /// CTs an API operation is changing: their changes are announced by the operation.
    busy: BTreeSet<Ctid>,
}

#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
    watch: Arc<Mutex<Watch>>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        // A subscriber more than this many events behind is told it lagged.
        let (tx, _) = broadcast::channel(1024);
        Self {
            tx,
            watch: Arc::default(),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An API operation starts changing `ctid`.
    pub fn begin(&self, ctid: Ctid) {
        self.watch().busy.insert(ctid);
    }

    /// An API operation on `ctid` ended; `event` is its change (none after a failure).
    pub fn end(&self, host: &Host, ctid: Ctid, event: Option<Event>) {
        let mut w = self.watch();
        w.busy.remove(&ctid);
        if let Some(known) = w.known.as_mut() {
            match read_one(host, ctid) {
                Some(s) => known.insert(ctid, s),
                None => known.remove(&ctid),
            };
        }
        drop(w);
        if let Some(e) = event {
            let _ = self.tx.send(e);
        }
    }

    /// One comparison (on a blocking thread): the changes since the last one, announced.
    pub fn check(&self, host: &Host, now: i64) {
        if self.tx.receiver_count() == 0 {
            self.watch().known = None;
            return;
        }
        let current = read_all(host);
        let mut w = self.watch();
        let busy = w.busy.clone();
        let Some(known) = w.known.as_mut() else {
            // The first subscriber: this is the baseline.
            w.known = Some(current);
            return;
        };
        let mut out = Vec::new();
        for (ctid, now_seen) in &current {
            if busy.contains(ctid) {
                continue;
            }
            let kind = match known.get(ctid) {
                None => Some("created"),
                Some(old) if old.state != now_seen.state => {
                    Some(transition(&old.state, &now_seen.state))
                }
                Some(old) if old.conf_mtime != now_seen.conf_mtime => Some("settings_changed"),
                Some(_) => None,
            };
            if let Some(kind) = kind {
                out.push(Event {
                    kind,
                    ctid: *ctid,
                    status: Some(now_seen.state.clone()),
                    source: "host",
                    operation: None,
                    time: now,
                });
            }
            known.insert(*ctid, now_seen.clone());
        }
        let gone: Vec<Ctid> = known
            .keys()
            .filter(|c| !current.contains_key(c) && !busy.contains(c))
            .copied()
            .collect();
        for ctid in gone {
            known.remove(&ctid);
            out.push(Event {
                kind: "destroyed",
                ctid,
                status: None,
                source: "host",
                operation: None,
                time: now,
            });
        }
        drop(w);
        for e in out {
            let _ = self.tx.send(e);
        }
    }
}

fn transition(old: &str, new: &str) -> &'static str {
    match (old, new) {
        ("suspended", "running") => "resumed",
        (_, "running") => "started",
        (_, "suspended") => "suspended",
        _ => "stopped",
    }
}

/// The event an API operation's success is (`None` for one that changed nothing).
pub fn of_op(op: &str, result: &serde_json::Value) -> Option<&'static str> {
    if result.get("changed") == Some(&serde_json::Value::Bool(false)) {
        return None;
    }
    Some(match op {
        "create" => "created",
        "set" => "settings_changed",
        "start" => "started",
        "stop" => "stopped",
        "restart" => "restarted",
        "suspend" => "suspended",
        "resume" => "resumed",
        "destroy" => "destroyed",
        _ => return None,
    })
}

fn read_one(host: &Host, ctid: Ctid) -> Option<Seen> {
    let conf = host.conf_path(ctid);
    let conf_mtime = std::fs::metadata(&conf).and_then(|m| m.modified()).ok()?;
    let state = container::status(host, ctid).ok()?.state.to_string();
    Some(Seen {
        state,
        conf_mtime: Some(conf_mtime),
    })
}

fn read_all(host: &Host) -> BTreeMap<Ctid, Seen> {
    host.list_ctids()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| read_one(host, c).map(|s| (c, s)))
        .collect()
}

/// The state's name as the CT object's `status` has it.
pub fn state_of(host: &Host, ctid: Ctid) -> Option<String> {
    container::status(host, ctid)
        .ok()
        .map(|s| s.state.to_string())
}
