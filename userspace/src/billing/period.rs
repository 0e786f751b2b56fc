//! Billing periods: per CT a billing day (1–31, clamped to short months) or the anniversary of
//! its creation, in an IANA time zone. A period starts at local midnight of the billing day and
//! is half-open, [start, end) in UTC instants. Every boundary is computed from the anchor, never
//! chained from the previous period, so a clamped February does not shift March, and a DST month
//! is an hour shorter or longer (its slot count follows).
use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

use super::{BillingError, SLOT_SECS};

/// What a CT's periods are anchored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingAnchor {
    /// Day of the month 1–31; months shorter than that start on their last day.
    Day(u8),
    /// The local day of the month the CT was created on.
    Anniversary,
}

impl BillingAnchor {
    /// `1`…`31` or `anniversary`.
    pub fn parse(s: &str) -> Result<BillingAnchor, BillingError> {
        if s == "anniversary" {
            return Ok(BillingAnchor::Anniversary);
        }
        let day: i64 = s
            .parse()
            .map_err(|_| BillingError::BillingDaySyntax(s.to_string()))?;
        BillingAnchor::day(day)
    }

    pub fn day(day: i64) -> Result<BillingAnchor, BillingError> {
        match u8::try_from(day) {
            Ok(d @ 1..=31) => Ok(BillingAnchor::Day(d)),
            _ => Err(BillingError::BillingDay(day)),
        }
    }
}

/// One billing period of one CT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    /// Local year and month the period starts in: its `YYYY-MM` name.
    pub year: i16,
    pub month: i8,
    /// First instant of the period (Unix seconds).
    pub start: i64,
    /// First instant after the period (Unix seconds).
    pub end: i64,
}

impl Period {
    /// `YYYY-MM`.
    pub fn label(&self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }

    pub fn contains(&self, t: i64) -> bool {
        self.start <= t && t < self.end
    }

    /// Number of 5-minute slots the period touches (a zone with an offset that is not a multiple
    /// of 5 minutes, such as historic local mean time, shares its boundary slots).
    pub fn slot_count(&self) -> i64 {
        let first = super::slot_of(self.start);
        let end = (self.end + SLOT_SECS - 1).div_euclid(SLOT_SECS) * SLOT_SECS;
        (end - first) / SLOT_SECS
    }

    /// Parses `YYYY-MM` strictly (4-digit year 1970–9999, 2-digit month).
    pub fn parse_label(s: &str) -> Result<(i16, i8), BillingError> {
        let bad = || BillingError::PeriodSyntax(s.to_string());
        let b = s.as_bytes();
        if b.len() != 7
            || b[4] != b'-'
            || !b
                .iter()
                .enumerate()
                .all(|(i, c)| i == 4 || c.is_ascii_digit())
        {
            return Err(bad());
        }
        let year: i16 = s[..4].parse().map_err(|_| bad())?;
        let month: i8 = s[5..].parse().map_err(|_| bad())?;
        if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok((year, month))
    }
}

/// How periods are laid out under one setting: the resolved billing day and the time zone.
#[derive(Debug, Clone)]
struct Layout {
    anchor: BillingAnchor,
    day: i8,
    tz: TimeZone,
    tz_name: String,
}

impl Layout {
    /// `tz` is an IANA name (`UTC`, `Europe/Berlin`); `created` (Unix seconds) resolves
    /// [`BillingAnchor::Anniversary`] to the local day of the month of the CT's creation.
    fn new(anchor: BillingAnchor, tz: &str, created: i64) -> Result<Layout, BillingError> {
        let zone = jiff::tz::db()
            .get(tz)
            .map_err(|source| BillingError::TimeZone {
                name: tz.to_string(),
                source,
            })?;
        let day = match anchor {
            BillingAnchor::Day(d @ 1..=31) => d as i8,
            BillingAnchor::Day(d) => return Err(BillingError::BillingDay(i64::from(d))),
            BillingAnchor::Anniversary => {
                let ts = timestamp(created, tz)?;
                zone.to_datetime(ts).date().day()
            }
        };
        Ok(Layout {
            anchor,
            day,
            tz: zone,
            tz_name: tz.to_string(),
        })
    }

    /// `t` as RFC 3339 with this zone's offset at that instant (`2026-03-01T00:00:00+01:00`).
    fn rfc3339(&self, t: i64) -> Result<String, BillingError> {
        let ts = timestamp(t, &self.tz_name)?;
        Ok(ts.display_with_offset(self.tz.to_offset(ts)).to_string())
    }

    /// Start of the period named `year-month`: local midnight of the billing day, clamped to the
    /// month's last day. A midnight skipped by a DST change starts at the first instant after it.
    fn start_of(&self, year: i16, month: i8) -> Result<i64, BillingError> {
        let err = |source| BillingError::PeriodRange {
            what: format!("{year:04}-{month:02}"),
            tz: self.tz_name.clone(),
            source,
        };
        let first = Date::new(year, month, 1).map_err(err)?;
        let day = self.day.min(first.days_in_month());
        let date = Date::new(year, month, day).map_err(err)?;
        let zdt = date.to_zoned_datetime(self.tz.clone()).map_err(err)?;
        Ok(zdt.timestamp().as_second())
    }

    fn period(&self, year: i16, month: i8) -> Result<Period, BillingError> {
        let (ny, nm) = next_month(year, month);
        Ok(Period {
            year,
            month,
            start: self.start_of(year, month)?,
            end: self.start_of(ny, nm)?,
        })
    }

    /// The period holding instant `t` (Unix seconds).
    fn period_of(&self, t: i64) -> Result<Period, BillingError> {
        let date = self.tz.to_datetime(timestamp(t, &self.tz_name)?).date();
        let p = self.period(date.year(), date.month())?;
        if t < p.start {
            let (py, pm) = prev_month(date.year(), date.month());
            self.period(py, pm)
        } else {
            Ok(p)
        }
    }

    fn next(&self, p: &Period) -> Result<Period, BillingError> {
        let (y, m) = next_month(p.year, p.month);
        self.period(y, m)
    }
}

/// Settings that applied before a change: `anchor` in `tz` until the instant `until`, from which
/// the next (newer) settings apply. `until` is always a period boundary of the settings before
/// it: a change of billing day or time zone takes effect at the end of the period it was made in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorChange {
    pub until: i64,
    pub anchor: BillingAnchor,
    pub tz: String,
}

/// One stretch of a CT's settings: `layout` from the instant `from`.
#[derive(Debug, Clone)]
struct Segment {
    from: i64,
    layout: Layout,
    /// The first period under these settings (none for the first settings): it starts at
    /// `from`, where the previous settings' last period ended, and ends where the first period
    /// of these settings named after that last one ends. So a period name (`YYYY-MM`) is never
    /// used twice, and no instant falls outside a period.
    first: Option<Period>,
}

/// How one CT's periods are laid out: its billing day and time zone, and the earlier settings
/// with the instant each stopped applying (see [`AnchorChange`]).
///
/// A change mid-period leaves that period as it was (its start, its end, every byte booked in
/// it). The new settings apply from its end: the first period under them runs from there to
/// the end of the first new-settings period named after the old last one, e.g. billing day 1
/// (UTC) changed to 15 during January: January stays 1 Jan–1 Feb, then `YYYY-02` runs 1 Feb–
/// 15 Mar, then 15 Mar–15 Apr. Changed from 15 to 1 during January (period `YYYY-01`, 15 Jan–
/// 15 Feb): `YYYY-02` is 15 Feb–1 Mar, a short period, then 1 Mar–1 Apr.
#[derive(Debug, Clone)]
pub struct PeriodSpec {
    /// Oldest first; `segments[0].from` is `i64::MIN`.
    segments: Vec<Segment>,
}

impl PeriodSpec {
    /// One setting for all time. `tz` is an IANA name (`UTC`, `Europe/Berlin`); `created`
    /// (Unix seconds) resolves [`BillingAnchor::Anniversary`] to the local day of the month of
    /// the CT's creation.
    pub fn new(anchor: BillingAnchor, tz: &str, created: i64) -> Result<PeriodSpec, BillingError> {
        Ok(PeriodSpec {
            segments: vec![Segment {
                from: i64::MIN,
                layout: Layout::new(anchor, tz, created)?,
                first: None,
            }],
        })
    }

    /// The current `anchor` and `tz`, after the earlier settings `history` (oldest first).
    pub fn with_history(
        history: &[AnchorChange],
        anchor: BillingAnchor,
        tz: &str,
        created: i64,
    ) -> Result<PeriodSpec, BillingError> {
        let Some((oldest, rest)) = history.split_first() else {
            return PeriodSpec::new(anchor, tz, created);
        };
        let mut spec = PeriodSpec::new(oldest.anchor, &oldest.tz, created)?;
        let mut from = oldest.until;
        for h in rest {
            spec.push(from, Layout::new(h.anchor, &h.tz, created)?)?;
            from = h.until;
        }
        spec.push(from, Layout::new(anchor, tz, created)?)?;
        Ok(spec)
    }

    fn push(&mut self, from: i64, layout: Layout) -> Result<(), BillingError> {
        let last = self.period_of(from - 1)?;
        let mut q = layout.period_of(from)?;
        while (q.year, q.month) <= (last.year, last.month) {
            q = layout.next(&q)?;
        }
        self.segments.push(Segment {
            from,
            layout,
            first: Some(Period { start: from, ..q }),
        });
        Ok(())
    }

    /// The instant a change of settings made at `now` takes effect: the end of the period
    /// holding `now`.
    pub fn change_takes_effect(&self, now: i64) -> Result<i64, BillingError> {
        Ok(self.period_of(now)?.end)
    }

    fn current(&self) -> &Layout {
        &self.segments.last().expect("never empty").layout
    }

    fn segment_at(&self, t: i64) -> usize {
        self.segments.partition_point(|s| s.from <= t).max(1) - 1
    }

    /// The billing day of the current settings, resolved (1–31).
    pub fn billing_day(&self) -> u8 {
        self.current().day as u8
    }

    /// The time zone of the current settings.
    pub fn tz_name(&self) -> &str {
        &self.current().tz_name
    }

    /// The billing anchor and time zone the period holding `t` is laid out with.
    pub fn settings_at(&self, t: i64) -> (BillingAnchor, &str) {
        let l = &self.segments[self.segment_at(t)].layout;
        (l.anchor, &l.tz_name)
    }

    /// `t` as RFC 3339 with the offset of the zone in effect at `t`
    /// (`2026-03-01T00:00:00+01:00`).
    pub fn rfc3339(&self, t: i64) -> Result<String, BillingError> {
        self.segments[self.segment_at(t)].layout.rfc3339(t)
    }

    /// `p` truncated where the next settings begin (a history that does not end on a period
    /// boundary, such as one edited by hand, still tiles time).
    fn clip(&self, i: usize, mut p: Period) -> Period {
        if let Some(next) = self.segments.get(i + 1) {
            p.end = p.end.min(next.from);
        }
        p
    }

    /// The period holding instant `t` (Unix seconds).
    pub fn period_of(&self, t: i64) -> Result<Period, BillingError> {
        let i = self.segment_at(t);
        let seg = &self.segments[i];
        if let Some(first) = seg.first
            && t < first.end
        {
            return Ok(self.clip(i, first));
        }
        Ok(self.clip(i, seg.layout.period_of(t)?))
    }

    /// The period named `YYYY-MM` in this CT's terms (the one starting in that local month).
    pub fn parse(&self, label: &str) -> Result<Period, BillingError> {
        let (year, month) = Period::parse_label(label)?;
        for (i, seg) in self.segments.iter().enumerate().rev() {
            if let Some(first) = seg.first {
                if (year, month) < (first.year, first.month) {
                    continue;
                }
                if (year, month) == (first.year, first.month) {
                    return Ok(self.clip(i, first));
                }
            }
            let p = seg.layout.period(year, month)?;
            if self.segments.get(i + 1).is_some_and(|n| p.start >= n.from) {
                // Skipped by a change of time zone across a month edge.
                return Err(BillingError::NoSuchPeriod(label.to_string()));
            }
            return Ok(self.clip(i, p));
        }
        unreachable!("the first segment takes every label")
    }

    pub fn next(&self, p: &Period) -> Result<Period, BillingError> {
        self.period_of(p.end)
    }

    pub fn prev(&self, p: &Period) -> Result<Period, BillingError> {
        self.period_of(p.start - 1)
    }
}

fn timestamp(t: i64, tz: &str) -> Result<Timestamp, BillingError> {
    Timestamp::from_second(t).map_err(|source| BillingError::PeriodRange {
        what: format!("instant {t}"),
        tz: tz.to_string(),
        source,
    })
}

fn next_month(year: i16, month: i8) -> (i16, i8) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

fn prev_month(year: i16, month: i8) -> (i16, i8) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn utc_first_of_month() {
        let spec = PeriodSpec::new(BillingAnchor::Day(1), "UTC", 0).unwrap();
        let p = spec.parse("2026-02").unwrap();
        assert_eq!(p.start, utc("2026-02-01T00:00:00Z"));
        assert_eq!(p.end, utc("2026-03-01T00:00:00Z"));
        assert_eq!(p.slot_count(), 28 * 288);
        assert_eq!(p.label(), "2026-02");
        assert_eq!(spec.period_of(p.start).unwrap(), p);
        assert_eq!(spec.period_of(p.end - 1).unwrap(), p);
        assert_eq!(spec.period_of(p.end).unwrap(), spec.next(&p).unwrap());
        assert_eq!(spec.prev(&spec.next(&p).unwrap()).unwrap(), p);
    }

    #[test]
    fn day_31_clamps_to_short_months_without_drifting() {
        let spec = PeriodSpec::new(BillingAnchor::Day(31), "UTC", 0).unwrap();
        let feb = spec.parse("2026-02").unwrap();
        assert_eq!(feb.start, utc("2026-02-28T00:00:00Z"));
        assert_eq!(feb.end, utc("2026-03-31T00:00:00Z"));
        let apr = spec.parse("2026-04").unwrap();
        assert_eq!(apr.start, utc("2026-04-30T00:00:00Z"));
        assert_eq!(apr.end, utc("2026-05-31T00:00:00Z"));
        // Leap year: 29 February.
        assert_eq!(
            spec.parse("2028-02").unwrap().start,
            utc("2028-02-29T00:00:00Z")
        );
        // 2026-03-15 is after 2026-02-28 and before 2026-03-31: the February period.
        assert_eq!(spec.period_of(utc("2026-03-15T12:00:00Z")).unwrap(), feb);
        // December 31 to January 31 across the year.
        let dec = spec.parse("2026-12").unwrap();
        assert_eq!(dec.end, utc("2027-01-31T00:00:00Z"));
        assert_eq!(spec.next(&dec).unwrap().label(), "2027-01");
    }

    #[test]
    fn day_31_in_berlin_across_both_dst_changes() {
        let spec = PeriodSpec::new(BillingAnchor::Day(31), "Europe/Berlin", 0).unwrap();
        // 2026: DST starts 29 March 01:00 UTC, ends 25 October 01:00 UTC.
        let feb = spec.parse("2026-02").unwrap();
        assert_eq!(feb.start, utc("2026-02-27T23:00:00Z")); // 28 Feb 00:00 CET
        assert_eq!(feb.end, utc("2026-03-30T22:00:00Z")); // 31 Mar 00:00 CEST
        // 31 days of local time minus the skipped hour.
        assert_eq!(feb.end - feb.start, 31 * 86400 - 3600);
        assert_eq!(feb.slot_count(), 31 * 288 - 12);
        let sep = spec.parse("2026-09").unwrap();
        assert_eq!(sep.start, utc("2026-09-29T22:00:00Z")); // 30 Sep 00:00 CEST
        assert_eq!(sep.end, utc("2026-10-30T23:00:00Z")); // 31 Oct 00:00 CET
        assert_eq!(sep.end - sep.start, 31 * 86400 + 3600);
        assert_eq!(sep.slot_count(), 31 * 288 + 12);
        // An instant in the hour after the October change belongs to September's period.
        assert_eq!(spec.period_of(utc("2026-10-25T01:30:00Z")).unwrap(), sep);
        assert_eq!(spec.period_of(sep.end).unwrap().label(), "2026-10");
        assert_eq!(spec.period_of(sep.start - 1).unwrap().label(), "2026-08");
    }

    #[test]
    fn every_period_is_contiguous_for_years_in_several_zones() {
        for tz in [
            "UTC",
            "Europe/Berlin",
            "America/New_York",
            "Australia/Lord_Howe",
            "Asia/Kathmandu",
        ] {
            for day in [1u8, 15, 29, 30, 31] {
                let spec = PeriodSpec::new(BillingAnchor::Day(day), tz, 0).unwrap();
                let mut p = spec.parse("2024-01").unwrap();
                for _ in 0..36 {
                    let n = spec.next(&p).unwrap();
                    assert_eq!(p.end, n.start, "{tz} day {day} {}", p.label());
                    assert!(p.end - p.start >= 28 * 86400 - 3600);
                    assert_eq!(spec.period_of(p.start).unwrap(), p);
                    assert_eq!(spec.period_of(p.end - 1).unwrap(), p);
                    p = n;
                }
            }
        }
    }

    #[test]
    fn anniversary_uses_the_local_creation_day() {
        // 2026-05-14 23:30 UTC is already 15 May in Berlin.
        let created = utc("2026-05-14T23:30:00Z");
        let spec = PeriodSpec::new(BillingAnchor::Anniversary, "Europe/Berlin", created).unwrap();
        assert_eq!(spec.billing_day(), 15);
        let utc_spec = PeriodSpec::new(BillingAnchor::Anniversary, "UTC", created).unwrap();
        assert_eq!(utc_spec.billing_day(), 14);
        assert_eq!(
            spec.period_of(created).unwrap().start,
            utc("2026-05-14T22:00:00Z")
        );
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert!(matches!(
            BillingAnchor::parse("0"),
            Err(BillingError::BillingDay(0))
        ));
        assert!(matches!(
            BillingAnchor::parse("32"),
            Err(BillingError::BillingDay(32))
        ));
        assert!(matches!(
            BillingAnchor::parse("x"),
            Err(BillingError::BillingDaySyntax(_))
        ));
        assert_eq!(
            BillingAnchor::parse("anniversary").unwrap(),
            BillingAnchor::Anniversary
        );
        assert!(matches!(
            PeriodSpec::new(BillingAnchor::Day(32), "UTC", 0),
            Err(BillingError::BillingDay(32))
        ));
        let e = PeriodSpec::new(BillingAnchor::Day(1), "Mars/Olympus", 0).unwrap_err();
        assert!(matches!(e, BillingError::TimeZone { .. }));
        assert!(e.to_string().contains("Mars/Olympus"));
        let spec = PeriodSpec::new(BillingAnchor::Day(1), "UTC", 0).unwrap();
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-01",
            "2026/01",
            "2026-01-01",
            "",
            "1969-12",
            "２０２６-01",
        ] {
            assert!(
                matches!(spec.parse(bad), Err(BillingError::PeriodSyntax(_))),
                "{bad}"
            );
        }
    }
}

#[cfg(test)]
#[path = "period_history_tests.rs"]
mod history_tests;
