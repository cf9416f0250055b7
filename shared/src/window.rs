//! Maintenance windows: when a job may contact a device.
//!
//! Owns the `maintenance` part of a job spec (windows as a cron expression, a duration and a
//! time zone, optionally chosen per device by selector and per device's time-zone tag),
//! its validation, and the pure question "is this device's window open at this instant, and
//! if not, when does it open". No I/O and no clock: callers pass the time, so every rule is
//! unit-tested here. Workers ask it before each delivery; a closed window parks the task
//! without an attempt ([`crate::parking`]).

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::{
    device::{AttributeFilter, Device},
    job::SpecError,
};

/// Most windows a job may name.
pub const MAX_WINDOWS: usize = 64;
/// Longest window: a week.
pub const MAX_WINDOW_SECS: u64 = 7 * 24 * 3600;

/// When a job's devices may be contacted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Maintenance {
    /// The windows; a device uses the first whose selector it matches (a window without a
    /// selector matches every device). A device no window selects is not restricted.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// A device tag naming the device's IANA time zone (e.g. `tz` with `tz=Europe/Berlin`):
    /// where a device has it, its window's times are read in that zone, so each site is
    /// updated in its own night.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone_tag: Option<String>,
}

/// One recurring window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// A name for reports and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the window opens: a cron expression of 5 fields (minute hour day-of-month month
    /// day-of-week) or 6 (a leading seconds field), e.g. `0 2 * * *` for 02:00 every night.
    pub cron: String,
    /// How long it stays open, in seconds.
    pub duration_secs: u64,
    /// IANA time zone the expression is read in (default UTC), unless the device's
    /// `time_zone_tag` names another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Devices this window applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<AttributeFilter>,
}

/// Where a device's window stands at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No window applies to the device: contact it at any time.
    Unrestricted,
    /// Open until this instant (ms since epoch).
    Open {
        /// When it closes.
        closes_at_ms: u64,
    },
    /// Closed until this instant (ms since epoch); `None` if it never opens again.
    Closed {
        /// When it opens next.
        opens_at_ms: Option<u64>,
    },
}

/// What a recurring schedule does at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    /// Nothing is due.
    Wait,
    /// Run the occurrence of this time (ms since epoch) now.
    Fire(u64),
    /// Pass over occurrences up to this one without running them (missed, policy `skip`).
    Skip(u64),
}

/// What a missed occurrence (one not run within `late_after` of its time, because no
/// coordinator ran) becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Not run; the schedule goes on with its next occurrence.
    #[default]
    Skip,
    /// The latest missed occurrence runs once, late (earlier ones are not run).
    RunOnce,
}

/// The next step of a schedule whose occurrences up to `done_ms` are handled, at `now_ms`:
/// the latest occurrence after `done_ms` and not after `now_ms` fires if it is at most
/// `late_after_ms` old, else it is skipped or run once late, as `missed` says. `None` for an
/// expression or zone that does not parse.
pub fn occurrence(
    cron: &str,
    zone: &str,
    done_ms: u64,
    now_ms: u64,
    late_after_ms: u64,
    missed: Missed,
) -> Option<Occurrence> {
    let cron = parse_cron(cron).ok()?;
    let zone = parse_zone(zone).ok()?;
    let at = |ms: u64| -> Option<DateTime<Tz>> {
        Some(
            Utc.timestamp_millis_opt(i64::try_from(ms).ok()?)
                .single()?
                .with_timezone(&zone),
        )
    };
    let ms = |t: DateTime<Tz>| u64::try_from(t.timestamp_millis()).unwrap_or(0);
    let Ok(latest) = cron.find_previous_occurrence(&at(now_ms)?, true) else {
        return Some(Occurrence::Wait);
    };
    let latest = ms(latest);
    if latest <= done_ms {
        return Some(Occurrence::Wait);
    }
    Some(
        if now_ms.saturating_sub(latest) <= late_after_ms || missed == Missed::RunOnce {
            Occurrence::Fire(latest)
        } else {
            Occurrence::Skip(latest)
        },
    )
}

/// The first occurrence after `after_ms`, if any.
pub fn next_occurrence(cron: &str, zone: &str, after_ms: u64) -> Option<u64> {
    let cron = parse_cron(cron).ok()?;
    let zone = parse_zone(zone).ok()?;
    let after = Utc
        .timestamp_millis_opt(i64::try_from(after_ms).ok()?)
        .single()?
        .with_timezone(&zone);
    let next = cron.find_next_occurrence(&after, false).ok()?;
    u64::try_from(next.timestamp_millis()).ok()
}

/// An instant (ms since epoch) as RFC 3339 in UTC, to the second.
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .map_or_else(
            || ms.to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

/// Checks a cron expression.
///
/// # Errors
/// What is wrong with it.
pub fn check_cron(expr: &str) -> Result<(), String> {
    parse_cron(expr).map(|_| ())
}

/// Checks an IANA time zone name.
///
/// # Errors
/// What is wrong with it.
pub fn check_zone(name: &str) -> Result<(), String> {
    parse_zone(name).map(|_| ())
}

fn parse_cron(expr: &str) -> Result<Cron, String> {
    Cron::from_str(expr).map_err(|e| format!("{expr:?} is not a cron expression: {e}"))
}

fn parse_zone(name: &str) -> Result<Tz, String> {
    Tz::from_str(name).map_err(|_| format!("{name:?} is not an IANA time zone name"))
}

impl Maintenance {
    /// Whether the job has windows at all.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Checks every window, naming the field at fault.
    ///
    /// # Errors
    /// The first field that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.windows.len() > MAX_WINDOWS {
            return Err(SpecError::new(
                "maintenance.windows",
                format!("{} windows; at most {MAX_WINDOWS}", self.windows.len()),
            ));
        }
        if let Some(tag) = &self.time_zone_tag {
            crate::device::validate_id(tag)
                .map_err(|p| SpecError::new("maintenance.time_zone_tag", p))?;
        }
        for (i, w) in self.windows.iter().enumerate() {
            let at = |f: &str| format!("maintenance.windows[{i}].{f}");
            parse_cron(&w.cron).map_err(|p| SpecError::new(at("cron"), p))?;
            if w.duration_secs == 0 || w.duration_secs > MAX_WINDOW_SECS {
                return Err(SpecError::new(
                    at("duration_secs"),
                    format!(
                        "{} is out of range: 1 to {MAX_WINDOW_SECS} (a week)",
                        w.duration_secs
                    ),
                ));
            }
            if let Some(z) = &w.time_zone {
                parse_zone(z).map_err(|p| SpecError::new(at("time_zone"), p))?;
            }
        }
        Ok(())
    }

    /// The window that applies to `device` (`None` for a device no window selects). A
    /// device unknown to the registry is matched as one without attributes.
    pub fn window_of(&self, device: Option<&Device>) -> Option<&Window> {
        self.windows.iter().find(|w| match (&w.selector, device) {
            (None, _) => true,
            (Some(sel), Some(d)) => sel.matches(d),
            (Some(sel), None) => sel.is_empty(),
        })
    }

    /// Where `device`'s window stands at `now_ms`. A window or zone that no longer parses
    /// (stored before a rule changed) restricts nothing rather than holding devices forever.
    pub fn verdict(&self, device: Option<&Device>, now_ms: u64) -> Verdict {
        let Some(w) = self.window_of(device) else {
            return Verdict::Unrestricted;
        };
        let zone = self
            .time_zone_tag
            .as_ref()
            .and_then(|tag| device.and_then(|d| d.tags.get(tag)))
            .and_then(|name| parse_zone(name).ok())
            .or_else(|| w.time_zone.as_deref().and_then(|z| parse_zone(z).ok()))
            .unwrap_or(Tz::UTC);
        match w.verdict_in(zone, now_ms) {
            Some(v) => v,
            None => Verdict::Unrestricted,
        }
    }
}

impl Window {
    /// Where this window stands at `now_ms`, read in `zone`; `None` if the expression does
    /// not parse.
    pub fn verdict_in(&self, zone: Tz, now_ms: u64) -> Option<Verdict> {
        let cron = parse_cron(&self.cron).ok()?;
        let now_utc: DateTime<Utc> = Utc
            .timestamp_millis_opt(i64::try_from(now_ms).ok()?)
            .single()?;
        let now = now_utc.with_timezone(&zone);
        let ms = |t: DateTime<Tz>| u64::try_from(t.timestamp_millis()).unwrap_or(0);
        let duration_ms = self.duration_secs.saturating_mul(1000);
        if let Ok(opened) = cron.find_previous_occurrence(&now, true) {
            let closes = ms(opened).saturating_add(duration_ms);
            if closes > now_ms {
                return Some(Verdict::Open {
                    closes_at_ms: closes,
                });
            }
        }
        Some(Verdict::Closed {
            opens_at_ms: cron.find_next_occurrence(&now, false).ok().map(ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc: &str) -> u64 {
        crate::job::rfc3339_ms(rfc).expect("an RFC 3339 time")
    }

    fn window(cron: &str, secs: u64, zone: Option<&str>) -> Window {
        Window {
            cron: cron.into(),
            duration_secs: secs,
            time_zone: zone.map(str::to_owned),
            ..Window::default()
        }
    }

    fn device(tags: &[(&str, &str)]) -> Device {
        Device {
            id: "d1".into(),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Device::default()
        }
    }

    #[test]
    fn a_nightly_window_is_open_in_its_own_zone_and_closed_outside() {
        let m = Maintenance {
            windows: vec![window("0 2 * * *", 3600, Some("Europe/Berlin"))],
            time_zone_tag: None,
        };
        // 02:30 in Berlin (winter, +01:00) is 01:30 UTC.
        assert_eq!(
            m.verdict(None, at("2026-12-05T01:30:00Z")),
            Verdict::Open {
                closes_at_ms: at("2026-12-05T02:00:00Z")
            }
        );
        // 03:30 Berlin: closed until 02:00 Berlin the next night.
        assert_eq!(
            m.verdict(None, at("2026-12-05T02:30:00Z")),
            Verdict::Closed {
                opens_at_ms: Some(at("2026-12-06T01:00:00Z"))
            }
        );
        // Summer time: 02:00 Berlin is 00:00 UTC.
        assert_eq!(
            m.verdict(None, at("2026-07-01T23:00:00Z")),
            Verdict::Closed {
                opens_at_ms: Some(at("2026-07-02T00:00:00Z"))
            }
        );
    }

    #[test]
    fn a_device_tag_names_its_time_zone_and_a_selector_its_window() {
        let m = Maintenance {
            windows: vec![
                Window {
                    selector: Some(AttributeFilter {
                        tags: [("site".to_owned(), "lab".to_owned())].into(),
                        ..AttributeFilter::default()
                    }),
                    ..window("0 12 * * *", 60, None)
                },
                window("0 2 * * *", 3600, None),
            ],
            time_zone_tag: Some("tz".into()),
        };
        let tokyo = device(&[("tz", "Asia/Tokyo")]);
        // 02:10 in Tokyo is 17:10 UTC the day before.
        assert!(matches!(
            m.verdict(Some(&tokyo), at("2026-12-04T17:10:00Z")),
            Verdict::Open { .. }
        ));
        assert!(matches!(
            m.verdict(Some(&device(&[])), at("2026-12-04T17:10:00Z")),
            Verdict::Closed { .. }
        ));
        // The lab's window is the noon one, UTC.
        let lab = device(&[("site", "lab")]);
        assert!(matches!(
            m.verdict(Some(&lab), at("2026-12-04T12:00:30Z")),
            Verdict::Open { .. }
        ));
        assert!(matches!(
            m.verdict(Some(&lab), at("2026-12-04T02:10:00Z")),
            Verdict::Closed { .. }
        ));
        // An unreadable zone tag falls back to the window's zone (UTC here).
        let bad = device(&[("tz", "Mars/Olympus")]);
        assert!(matches!(
            m.verdict(Some(&bad), at("2026-12-04T02:10:00Z")),
            Verdict::Open { .. }
        ));
    }

    #[test]
    fn windows_to_the_second_and_devices_no_window_selects() {
        let m = Maintenance {
            windows: vec![Window {
                selector: Some(AttributeFilter {
                    model: Some("m1".into()),
                    ..AttributeFilter::default()
                }),
                ..window("*/20 * * * * *", 5, None)
            }],
            time_zone_tag: None,
        };
        let m1 = Device {
            model: "m1".into(),
            ..device(&[])
        };
        assert_eq!(
            m.verdict(Some(&m1), at("2026-12-04T10:00:24.999Z")),
            Verdict::Open {
                closes_at_ms: at("2026-12-04T10:00:25Z")
            }
        );
        assert_eq!(
            m.verdict(Some(&m1), at("2026-12-04T10:00:25Z")),
            Verdict::Closed {
                opens_at_ms: Some(at("2026-12-04T10:00:40Z"))
            }
        );
        assert_eq!(
            m.verdict(Some(&device(&[])), at("2026-12-04T10:00:25Z")),
            Verdict::Unrestricted
        );
    }

    #[test]
    fn stepped_second_ranges_open_where_they_start() {
        let w = window("10-59/20 * * * * *", 5, None);
        assert_eq!(
            w.verdict_in(Tz::UTC, at("2026-12-04T10:00:31Z")),
            Some(Verdict::Open {
                closes_at_ms: at("2026-12-04T10:00:35Z")
            })
        );
        assert_eq!(
            w.verdict_in(Tz::UTC, at("2026-12-04T10:00:41Z")),
            Some(Verdict::Closed {
                opens_at_ms: Some(at("2026-12-04T10:00:50Z"))
            })
        );
    }

    #[test]
    fn recurring_occurrences_fire_on_time_and_missed_ones_follow_the_policy() {
        let every_10s = "*/10 * * * * *";
        let t = at("2026-12-04T10:00:00Z");
        let o = |done, now, missed| occurrence(every_10s, "UTC", done, now, 2_000, missed);
        // Due at 10:00:00, looked at 0.5 s later: fires.
        assert_eq!(
            o(t - 10_000, t + 500, Missed::Skip),
            Some(Occurrence::Fire(t))
        );
        // Already handled: waits for 10:00:10.
        assert_eq!(o(t, t + 9_000, Missed::Skip), Some(Occurrence::Wait));
        // No coordinator from 10:00:01 to 10:00:25: 10:00:10 and 10:00:20 were missed.
        assert_eq!(
            o(t, t + 25_000, Missed::Skip),
            Some(Occurrence::Skip(t + 20_000))
        );
        assert_eq!(
            o(t, t + 25_000, Missed::RunOnce),
            Some(Occurrence::Fire(t + 20_000))
        );
        // Back within the grace of 10:00:20: on time, whatever the policy.
        assert_eq!(
            o(t, t + 21_500, Missed::Skip),
            Some(Occurrence::Fire(t + 20_000))
        );
        // Nightly at 02:00 Berlin, looked at 01:00:30 UTC in winter.
        assert_eq!(
            occurrence(
                "0 2 * * *",
                "Europe/Berlin",
                0,
                at("2026-12-05T01:00:30Z"),
                60_000,
                Missed::Skip
            ),
            Some(Occurrence::Fire(at("2026-12-05T01:00:00Z")))
        );
        assert_eq!(
            next_occurrence("0 2 * * *", "Europe/Berlin", at("2026-12-05T01:00:00Z")),
            Some(at("2026-12-06T01:00:00Z"))
        );
        assert_eq!(rfc3339(at("2026-12-06T01:00:00Z")), "2026-12-06T01:00:00Z");
    }

    #[test]
    fn bad_windows_are_refused_by_field() {
        let bad = |w: Window, field: &str| {
            let m = Maintenance {
                windows: vec![window("0 2 * * *", 60, None), w],
                time_zone_tag: None,
            };
            let err = m.validate().expect_err("refused");
            assert_eq!(err.field, field, "{err}");
        };
        bad(
            window("0 25 * * *", 60, None),
            "maintenance.windows[1].cron",
        );
        bad(window("nightly", 60, None), "maintenance.windows[1].cron");
        bad(
            window("0 2 * * *", 0, None),
            "maintenance.windows[1].duration_secs",
        );
        bad(
            window("0 2 * * *", 60, Some("Europe/Berlinn")),
            "maintenance.windows[1].time_zone",
        );
        assert!(
            Maintenance {
                windows: vec![window("0 2 * * 1-5", 60, Some("America/New_York"))],
                time_zone_tag: Some("tz".into()),
            }
            .validate()
            .is_ok()
        );
    }
}
