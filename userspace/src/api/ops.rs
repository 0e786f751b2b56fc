//! Long operations: every state-changing request is an operation with an id; the request
//! waits for it (the default) or answers 202 at once (`?wait=false`), and
//! `GET /v1/operations/{id}[?wait=1]` reports it. berthd keeps the last [`KEEP`] operations.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use super::error::ApiError;

/// Finished operations kept for `GET /v1/operations/{id}`.
pub const KEEP: usize = 1000;

/// The longest `?wait=1` on an operation: a client waiting longer asks again.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Operation {
    pub id: String,
    /// The verb: create, set, start, stop, restart, suspend, resume, destroy.
    pub kind: &'static str,
    pub ctid: Option<u32>,
    /// `running`, `succeeded` or `failed`.
    pub status: &'static str,
    pub created: i64,
    pub finished: Option<i64>,
    /// The operation's result (as the blocking request returns it) once it succeeded.
    pub result: Option<Value>,
    /// The JSON error once it failed.
    pub error: Option<ApiError>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    ops: BTreeMap<String, watch::Sender<Operation>>,
    order: VecDeque<String>,
}

#[derive(Clone, Default)]
pub struct Operations {
    inner: Arc<Mutex<Inner>>,
}

impl Operations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new running operation.
    pub fn begin(&self, kind: &'static str, ctid: Option<u32>, now: i64) -> Operation {
        let mut g = self.lock();
        g.next += 1;
        // Unique within this berthd and unlikely to be reused by the next one.
        let id = format!("op-{}-{}", now, g.next);
        let op = Operation {
            id: id.clone(),
            kind,
            ctid,
            status: "running",
            created: now,
            finished: None,
            result: None,
            error: None,
        };
        let (tx, _) = watch::channel(op.clone());
        g.ops.insert(id.clone(), tx);
        g.order.push_back(id);
        while g.order.len() > KEEP {
            let Some(old) = g.order.front().cloned() else {
                break;
            };
            let running = g
                .ops
                .get(&old)
                .is_some_and(|t| t.borrow().status == "running");
            if running {
                break;
            }
            g.order.pop_front();
            g.ops.remove(&old);
        }
        op
    }

    pub fn finish(&self, id: &str, res: &Result<Value, ApiError>, now: i64) {
        let g = self.lock();
        if let Some(tx) = g.ops.get(id) {
            tx.send_modify(|op| {
                op.finished = Some(now);
                match res {
                    Ok(v) => {
                        op.status = "succeeded";
                        op.result = Some(v.clone());
                    }
                    Err(e) => {
                        op.status = "failed";
                        op.error = Some(e.clone());
                    }
                }
            });
        }
    }

    /// The operation, after waiting up to `wait` for it to finish.
    pub async fn get(&self, id: &str, wait: Duration) -> Option<Operation> {
        let mut rx = self.lock().ops.get(id)?.subscribe();
        if !wait.is_zero() {
            let _ = tokio::time::timeout(wait, rx.wait_for(|op| op.status != "running")).await;
        }
        let op = rx.borrow().clone();
        Some(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn waiting_sees_the_end() {
        let ops = Operations::default();
        let op = ops.begin("start", Some(101), 1);
        assert_eq!(
            ops.get(&op.id, Duration::ZERO).await.unwrap().status,
            "running"
        );
        let (o2, id) = (ops.clone(), op.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            o2.finish(&id, &Ok(serde_json::json!({"ok": 1})), 2);
        });
        let done = ops.get(&op.id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(done.status, "succeeded");
        assert_eq!(done.result.unwrap()["ok"], 1);
        assert!(ops.get("op-x", Duration::ZERO).await.is_none());
    }

    #[test]
    fn old_finished_operations_are_dropped() {
        let ops = Operations::default();
        let first = ops.begin("stop", None, 1);
        ops.finish(&first.id, &Ok(Value::Null), 1);
        for _ in 0..KEEP {
            let o = ops.begin("stop", None, 1);
            ops.finish(&o.id, &Ok(Value::Null), 1);
        }
        assert!(!ops.lock().ops.contains_key(&first.id));
        assert_eq!(ops.lock().ops.len(), KEEP);
    }
}
