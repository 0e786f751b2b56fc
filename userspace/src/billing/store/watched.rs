//! Since when the ledger has watched this node (`meta.watched_since`, Unix seconds, set by the
//! feed's first tick). A destroyed CT that no tick saw alive (created and destroyed between two
//! ticks, or while berthd was down) is billed from its retired record only when it went after
//! that: records of CTs destroyed before the ledger existed are not its history.

use rusqlite::{OptionalExtension, params};

use super::super::BillingError;
use super::Ledger;

impl Ledger {
    /// `None` before the feed recorded it (a new ledger, or one of an older berth).
    pub fn watched_since(&self) -> Result<Option<i64>, BillingError> {
        self.conn
            .query_row("SELECT v FROM meta WHERE k='watched_since'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql("reading since when the node is watched"))
    }

    /// Records `at` unless a time is recorded already.
    pub fn set_watched_since(&mut self, at: i64) -> Result<(), BillingError> {
        self.conn
            .execute(
                "INSERT INTO meta VALUES ('watched_since', ?1) ON CONFLICT(k) DO NOTHING",
                params![at],
            )
            .map_err(self.sql("recording since when the node is watched"))?;
        Ok(())
    }
}
