//! The byte layer the ledger's bytes are counted at (`meta.byte_layer`: 2 = the Ethernet
//! frame, 3 = the IP packet), recorded by berthd's feed from the datapath's setting, so every
//! export can say what its bytes are without the node's datapath at hand.

use rusqlite::{OptionalExtension, params};

use super::super::BillingError;
use super::Ledger;

/// What a ledger's bytes are: what was delivered (counted at the CT's host-side interface,
/// minus what berth's shaper then dropped), at a layer.
pub const BASIS: &str = "delivered";

impl Ledger {
    /// `"l2"` or `"l3"`; `None` before berthd recorded one.
    pub fn byte_layer(&self) -> Result<Option<&'static str>, BillingError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT v FROM meta WHERE k='byte_layer'", [], |r| r.get(0))
            .optional()
            .map_err(self.sql("reading the byte layer"))?;
        Ok(match v {
            Some(2) => Some("l2"),
            Some(3) => Some("l3"),
            _ => None,
        })
    }

    /// Records the layer (`l3`: the IP packet, else the frame) when it differs from the
    /// recorded one.
    pub fn set_byte_layer(&mut self, l3: bool) -> Result<(), BillingError> {
        let (v, name) = if l3 { (3, "l3") } else { (2, "l2") };
        if self.byte_layer()? == Some(name) {
            return Ok(());
        }
        self.conn
            .execute(
                "INSERT INTO meta VALUES ('byte_layer', ?1)
                 ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                params![v],
            )
            .map_err(self.sql("recording the byte layer"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::LedgerOptions;
    use super::*;

    #[test]
    fn the_layer_is_recorded_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let mut l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        assert_eq!(l.byte_layer().unwrap(), None);
        l.set_byte_layer(true).unwrap();
        assert_eq!(l.byte_layer().unwrap(), Some("l3"));
        l.set_byte_layer(false).unwrap();
        l.set_byte_layer(false).unwrap();
        drop(l);
        let r = Ledger::open_read_only(&path).unwrap();
        assert_eq!(r.byte_layer().unwrap(), Some("l2"));
    }
}
