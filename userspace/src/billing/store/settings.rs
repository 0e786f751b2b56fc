//! A CT's billing settings in the ledger: registration, the commit rate and class filter, and
//! changes of billing day or time zone, which take effect at the end of the current period and
//! are kept as history (`ct_anchor`) so that periods already billed never move.
use berth_common::MAX_CLASSES;
use rusqlite::{Connection, params};
use std::collections::HashMap;

use super::super::BillingError;
use super::super::period::{AnchorChange, BillingAnchor, PeriodSpec};
use super::{CtInfo, CtState, Ledger, validate_uuid};

impl Ledger {
    /// Registers a CT (at create, import or migration) with its settings, or updates a known
    /// one's CTID, destruction time, commit rate and classes. A known CT's billing day and time
    /// zone change only through [`Ledger::change_anchor`] (at a period boundary); a different
    /// one here is refused. Validates everything first: bad input changes nothing.
    pub fn register_ct(&mut self, info: &CtInfo) -> Result<(), BillingError> {
        validate_uuid(&info.uuid)?;
        if let Some(c) = &info.classes {
            validate_classes(c)?;
        }
        let old = self.cts.get(&info.uuid);
        if let Some(o) = old
            && (o.info.anchor != info.anchor || o.info.tz != info.tz)
        {
            return Err(BillingError::AnchorChange(info.uuid.clone()));
        }
        let history = old.map_or_else(|| info.history.clone(), |o| o.info.history.clone());
        let created = old.map_or(info.created, |s| s.info.created);
        let spec = PeriodSpec::with_history(&history, info.anchor, &info.tz, created)?;
        let commit = info
            .commit_bps
            .map(|c| i64::try_from(c).map_err(|_| BillingError::Commit(c)))
            .transpose()?;
        let is_new = old.is_none();
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.sql("registering a CT"))?;
        let id: i64 = tx
            .query_row(
                "INSERT INTO ct (uuid, ctid, billing_day, tz, created, destroyed, commit_bps, classes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (uuid) DO UPDATE SET ctid = excluded.ctid,
                   destroyed = excluded.destroyed, commit_bps = excluded.commit_bps,
                   classes = excluded.classes
                 RETURNING id",
                params![
                    info.uuid,
                    info.ctid,
                    anchor_name(info.anchor),
                    info.tz,
                    info.created,
                    info.destroyed,
                    commit,
                    info.classes.as_deref().map(encode_classes),
                ],
                |r| r.get(0),
            )
            .map_err(self.sql("registering a CT"))?;
        if is_new {
            for h in &history {
                insert_history(&tx, id, h).map_err(self.sql("registering a CT"))?;
            }
        }
        tx.commit().map_err(self.sql("registering a CT"))?;
        let old = self.cts.remove(&info.uuid);
        let (checkpoint, open, open_seq) = match old {
            Some(s) => (s.checkpoint, s.open, s.open_seq),
            None => (None, Vec::new(), 0),
        };
        let mut info = info.clone();
        info.created = created;
        info.history = history;
        self.cts.insert(
            info.uuid.clone(),
            CtState {
                id,
                info,
                spec,
                checkpoint,
                open,
                open_seq,
                period: None,
            },
        );
        Ok(())
    }

    /// Changes a CT's billing day and time zone as of `now`. The period holding `now` stays as
    /// it is; the new settings apply from its end (see [`PeriodSpec`] for the first period
    /// after it). A change still waiting for its period to end is replaced, and one back to the
    /// settings in effect cancels it. Returns when the new settings take effect, `None` when
    /// they are the ones in effect already.
    pub fn change_anchor(
        &mut self,
        uuid: &str,
        anchor: BillingAnchor,
        tz: &str,
        now: i64,
    ) -> Result<Option<i64>, BillingError> {
        let state = self.state(uuid)?;
        let (id, created) = (state.id, state.info.created);
        PeriodSpec::new(anchor, tz, created)?;
        let mut history = state.info.history.clone();
        let (mut cur_anchor, mut cur_tz) = (state.info.anchor, state.info.tz.clone());
        // A pending change (its `until` not reached yet) is forgotten: what it replaced is in
        // effect now.
        while let Some(h) = history.last()
            && h.until > now
        {
            let h = history.pop().expect("just seen");
            (cur_anchor, cur_tz) = (h.anchor, h.tz);
        }
        let effective = if (cur_anchor, cur_tz.as_str()) == (anchor, tz) {
            None
        } else {
            let before = PeriodSpec::with_history(&history, cur_anchor, &cur_tz, created)?;
            let at = before.change_takes_effect(now)?;
            history.push(AnchorChange {
                until: at,
                anchor: cur_anchor,
                tz: cur_tz,
            });
            Some(at)
        };
        let spec = PeriodSpec::with_history(&history, anchor, tz, created)?;
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.sql("changing a CT's billing day"))?;
        tx.execute(
            "DELETE FROM ct_anchor WHERE ct = ?1 AND until > ?2",
            params![id, now],
        )
        .map_err(self.sql("changing a CT's billing day"))?;
        if let (Some(_), Some(h)) = (effective, history.last()) {
            insert_history(&tx, id, h).map_err(self.sql("changing a CT's billing day"))?;
        }
        tx.execute(
            "UPDATE ct SET billing_day = ?1, tz = ?2 WHERE id = ?3",
            params![anchor_name(anchor), tz, id],
        )
        .map_err(self.sql("changing a CT's billing day"))?;
        tx.commit()
            .map_err(self.sql("changing a CT's billing day"))?;
        let s = self.cts.get_mut(uuid).expect("looked up above");
        s.info.anchor = anchor;
        s.info.tz = tz.to_string();
        s.info.history = history;
        s.spec = spec;
        s.period = None;
        Ok(effective)
    }

    pub(super) fn load_history(&self) -> Result<HashMap<i64, Vec<AnchorChange>>, BillingError> {
        let op = "loading the billing-day history";
        let mut stmt = self
            .conn
            .prepare("SELECT ct, until, billing_day, tz FROM ct_anchor ORDER BY ct, until")
            .map_err(self.sql(op))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(self.sql(op))?;
        let mut out: HashMap<i64, Vec<AnchorChange>> = HashMap::new();
        for r in rows {
            let (ct, until, day, tz) = r.map_err(self.sql(op))?;
            let anchor = BillingAnchor::parse(&day)
                .map_err(|e| self.corrupt(op, format!("CT id {ct}: {e}")))?;
            out.entry(ct)
                .or_default()
                .push(AnchorChange { until, anchor, tz });
        }
        Ok(out)
    }
}

fn anchor_name(a: BillingAnchor) -> String {
    match a {
        BillingAnchor::Day(d) => d.to_string(),
        BillingAnchor::Anniversary => "anniversary".to_string(),
    }
}

fn insert_history(tx: &Connection, id: i64, h: &AnchorChange) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT OR REPLACE INTO ct_anchor (ct, until, billing_day, tz) VALUES (?1, ?2, ?3, ?4)",
        params![id, h.until, anchor_name(h.anchor), h.tz],
    )
}

/// Version 1 → 2: the settings columns (NULL: no commit rate, every class); `ct_anchor` is in
/// [`SCHEMA`] already. One transaction: a crash leaves version 1 whole.
pub(super) fn migrate_v1(conn: &Connection) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(
        "ALTER TABLE ct ADD COLUMN commit_bps INTEGER;
         ALTER TABLE ct ADD COLUMN classes TEXT;
         UPDATE meta SET v = 2 WHERE k = 'schema';",
    )?;
    tx.commit()
}

/// `0,1,3`.
fn encode_classes(c: &[u8]) -> String {
    c.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

pub(super) fn decode_classes(s: &str) -> Option<Vec<u8>> {
    let c: Vec<u8> = s
        .split(',')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    validate_classes(&c).ok()?;
    Some(c)
}

fn validate_classes(c: &[u8]) -> Result<(), BillingError> {
    let mut sorted = c.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if c.is_empty()
        || sorted.len() != c.len()
        || sorted.iter().any(|&x| u32::from(x) >= MAX_CLASSES)
    {
        return Err(BillingError::Classes(encode_classes(c)));
    }
    Ok(())
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
