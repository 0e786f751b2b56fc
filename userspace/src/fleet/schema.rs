//! The central schema, created and upgraded by the shipper itself: `berth_schema_migrations`
//! records each version applied, all of a shipper's migrations run in one transaction under an
//! advisory lock, so shippers of many nodes starting at once apply each version exactly once.
//!
//! Instants are Unix seconds (`bigint`, as in the ledger: the views compare them exactly with
//! what the nodes computed); `berth_slot.slot_start` is a multiple of 300. Bytes and packets are
//! the node's own values for a row (upserts overwrite, never add), so rows of one CT from
//! several nodes are summed only by the views.
use tokio_postgres::Client;

use super::{FleetError, db};

/// The newest schema version this berth writes.
pub const VERSION: i32 = 1;

const V1: &str = r#"
CREATE TABLE berth_node (
    node text PRIMARY KEY,
    -- The last ledger seq whose rows are all in this database (committed with them).
    last_seq bigint NOT NULL DEFAULT 0,
    layer text,
    shipped_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE berth_ct (
    node text NOT NULL REFERENCES berth_node (node),
    ct_uuid uuid NOT NULL,
    ct_id bigint NOT NULL, -- the CTID (`ctid` is a system column in PostgreSQL)
    billing_day text NOT NULL,
    tz text NOT NULL,
    created bigint NOT NULL,
    destroyed bigint,
    commit_bps bigint,
    -- NULL: every class is billed.
    classes smallint[],
    PRIMARY KEY (node, ct_uuid)
);
CREATE TABLE berth_period (
    node text NOT NULL,
    ct_uuid uuid NOT NULL,
    period_start bigint NOT NULL,
    period_end bigint NOT NULL,
    -- YYYY-MM, as `berth billing report --period` names it.
    period text NOT NULL,
    PRIMARY KEY (node, ct_uuid, period_start)
);
CREATE INDEX berth_period_by_name ON berth_period (ct_uuid, period);
CREATE TABLE berth_total (
    node text NOT NULL,
    ct_uuid uuid NOT NULL,
    period_start bigint NOT NULL,
    direction text NOT NULL CHECK (direction IN ('in', 'out')),
    class smallint NOT NULL,
    family text NOT NULL CHECK (family IN ('ipv4', 'ipv6')),
    bytes bigint NOT NULL,
    packets bigint NOT NULL,
    PRIMARY KEY (node, ct_uuid, period_start, direction, class, family)
);
CREATE TABLE berth_slot (
    node text NOT NULL,
    ct_uuid uuid NOT NULL,
    slot_start bigint NOT NULL,
    direction text NOT NULL CHECK (direction IN ('in', 'out')),
    class smallint NOT NULL,
    family text NOT NULL CHECK (family IN ('ipv4', 'ipv6')),
    bytes bigint NOT NULL,
    packets bigint NOT NULL,
    flags smallint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (node, ct_uuid, slot_start, direction, class, family)
);
CREATE INDEX berth_slot_by_ct ON berth_slot (ct_uuid, slot_start);

-- A CT across nodes: created the earliest, destroyed only when destroyed on every node it was
-- on (the latest such instant), billed with the settings of the node it came to last.
CREATE VIEW berth_ct_fleet AS
SELECT a.ct_uuid, a.created, a.destroyed, s.ct_id, s.billing_day, s.tz, s.commit_bps, s.classes,
       a.nodes
FROM (SELECT ct_uuid, min(created) AS created,
             CASE WHEN bool_or(destroyed IS NULL) THEN NULL ELSE max(destroyed) END AS destroyed,
             array_agg(node ORDER BY created, node) AS nodes
      FROM berth_ct GROUP BY ct_uuid) a
JOIN (SELECT DISTINCT ON (ct_uuid) ct_uuid, ct_id, billing_day, tz, commit_bps, classes
      FROM berth_ct ORDER BY ct_uuid, created DESC, node DESC) s USING (ct_uuid);

-- A period by name across nodes: the earliest start and the latest end any node laid out.
CREATE VIEW berth_period_bounds AS
SELECT ct_uuid, period, min(period_start) AS period_start, max(period_end) AS period_end
FROM berth_period GROUP BY ct_uuid, period;

-- Exact totals of a CT's period, summed over the nodes it was on.
CREATE VIEW berth_monthly_totals AS
SELECT t.ct_uuid, p.period, t.direction, t.class, t.family,
       sum(t.bytes)::bigint AS bytes, sum(t.packets)::bigint AS packets,
       count(DISTINCT t.node) AS nodes
FROM berth_total t JOIN berth_period p USING (node, ct_uuid, period_start)
GROUP BY t.ct_uuid, p.period, t.direction, t.class, t.family;

-- The slots the 95th is over (p95.rs SlotWindow): [max(start, created), min(end, until)) widened
-- to whole 5-minute slots, empty when the CT did not live in the period.
CREATE FUNCTION berth_slot_window(p_start bigint, p_end bigint, p_created bigint, p_until bigint,
                                  OUT first_slot bigint, OUT end_slot bigint)
LANGUAGE sql IMMUTABLE AS $$
SELECT lo - ((lo % 300) + 300) % 300,
       CASE WHEN hi <= lo THEN lo - ((lo % 300) + 300) % 300
            ELSE hi + (300 - ((hi % 300) + 300) % 300) % 300 END
FROM (SELECT greatest(p_start, p_created) AS lo, least(p_end, p_until) AS hi) b
$$;

-- The nearest-rank 95th (p95.rs) of a CT over the slots [p_first, p_end) of every node summed
-- per slot first, each slot without a row counting as 0: k = ceil(95 n / 100). Bytes per slot
-- of the inbound and outbound series, of in+out (`sum`) and of max(in, out) (`max-per-slot`);
-- p_classes NULL: every class.
CREATE FUNCTION berth_p95(p_uuid uuid, p_first bigint, p_end bigint, p_classes smallint[],
                          OUT n bigint, OUT in_slot_bytes bigint, OUT out_slot_bytes bigint,
                          OUT sum_slot_bytes bigint, OUT max_per_slot_bytes bigint)
LANGUAGE sql STABLE AS $$
WITH v AS (
    SELECT slot_start,
           coalesce(sum(bytes) FILTER (WHERE direction = 'in'), 0)::bigint AS i,
           coalesce(sum(bytes) FILTER (WHERE direction = 'out'), 0)::bigint AS o
    FROM berth_slot
    WHERE ct_uuid = p_uuid AND slot_start >= p_first AND slot_start < p_end
      AND (p_classes IS NULL OR class = ANY (p_classes))
    GROUP BY slot_start),
j AS (
    SELECT coalesce(v.i, 0) AS i, coalesce(v.o, 0) AS o
    FROM generate_series(p_first, p_end - 300, 300) AS g (slot)
    LEFT JOIN v ON v.slot_start = g.slot),
k AS (SELECT count(*) AS n, greatest((95 * count(*) + 99) / 100, 1) AS k FROM j)
SELECT k.n,
       coalesce((SELECT i FROM j ORDER BY i OFFSET k.k - 1 LIMIT 1), 0),
       coalesce((SELECT o FROM j ORDER BY o OFFSET k.k - 1 LIMIT 1), 0),
       coalesce((SELECT i + o AS s FROM j ORDER BY s OFFSET k.k - 1 LIMIT 1), 0),
       coalesce((SELECT greatest(i, o) AS m FROM j ORDER BY m OFFSET k.k - 1 LIMIT 1), 0)
FROM k
$$;

-- A CT's bill per period across nodes, as `berth billing report` computes it on one node:
-- billed bytes (the CT's classes), the 95th in bit/s (bytes * 8 / 300 rounded down) per
-- direction and billed (`bits_per_second`: mode max), up to now() while the CT lives.
CREATE VIEW berth_monthly_bill AS
SELECT b.ct_uuid, b.period, b.period_start, b.period_end, c.created, c.destroyed,
       w.first_slot, w.end_slot,
       (SELECT coalesce(sum(t.bytes), 0)::bigint FROM berth_monthly_totals t
        WHERE t.ct_uuid = b.ct_uuid AND t.period = b.period AND t.direction = 'in'
          AND (c.classes IS NULL OR t.class = ANY (c.classes))) AS in_bytes,
       (SELECT coalesce(sum(t.bytes), 0)::bigint FROM berth_monthly_totals t
        WHERE t.ct_uuid = b.ct_uuid AND t.period = b.period AND t.direction = 'out'
          AND (c.classes IS NULL OR t.class = ANY (c.classes))) AS out_bytes,
       q.n,
       greatest(q.in_slot_bytes, q.out_slot_bytes) AS slot_bytes,
       greatest(q.in_slot_bytes, q.out_slot_bytes) * 8 / 300 AS bits_per_second,
       q.in_slot_bytes * 8 / 300 AS in_bits_per_second,
       q.out_slot_bytes * 8 / 300 AS out_bits_per_second,
       q.sum_slot_bytes * 8 / 300 AS sum_bits_per_second,
       q.max_per_slot_bytes * 8 / 300 AS max_per_slot_bits_per_second
FROM berth_period_bounds b
JOIN berth_ct_fleet c USING (ct_uuid)
CROSS JOIN LATERAL berth_slot_window(b.period_start, b.period_end, c.created,
    least(c.destroyed, extract(epoch FROM now())::bigint)) w
CROSS JOIN LATERAL berth_p95(b.ct_uuid, w.first_slot, w.end_slot, c.classes) q;
"#;

const MIGRATIONS: [&str; VERSION as usize] = [V1];

/// Brings the central schema to [`VERSION`]; a database already there is left as it is, one
/// with a newer version is an error (an older berth must not write into a schema it does not
/// know).
pub async fn migrate(client: &mut Client) -> Result<i32, FleetError> {
    let tx = client
        .transaction()
        .await
        .map_err(db("starting the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock(7305237744271190131)", &[])
        .await
        .map_err(db("locking the schema"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS berth_schema_migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(db("creating berth_schema_migrations"))?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM berth_schema_migrations",
            &[],
        )
        .await
        .map_err(db("reading the schema version"))?
        .get(0);
    if found > VERSION {
        return Err(FleetError::SchemaTooNew {
            found,
            known: VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql)
            .await
            .map_err(db("applying a schema migration"))?;
        tx.execute(
            "INSERT INTO berth_schema_migrations (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await
        .map_err(db("recording a schema migration"))?;
    }
    tx.commit().await.map_err(db("committing the migration"))?;
    Ok(VERSION)
}
