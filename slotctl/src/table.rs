//! `slotctl status`: the Status snapshot as aligned tables (or JSON), plus the small formatting helpers
//! that `top` shares (durations, countdowns, short ids).

use std::time::{Duration, SystemTime};

use serde_json::json;
use slotd_proto::v1 as pb;

/// A duration the way an operator reads it: `850ms`, `4.2s`, `42s`, `5m03s`, `2h05m`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 10_000 {
        format!("{}.{}s", ms / 1_000, (ms % 1_000) / 100)
    } else if ms < 60_000 {
        format!("{}s", ms / 1_000)
    } else if ms < 3_600_000 {
        let s = ms / 1_000;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = ms / 60_000;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// A wire duration as a `Duration` (negative or malformed ones read as zero).
pub fn from_wire(d: Option<&prost_types::Duration>) -> Duration {
    d.and_then(|d| Duration::try_from(*d).ok()).unwrap_or_default()
}

/// How long until `until`, or `None` when it is unset or already past.
pub fn remaining(until: Option<&prost_types::Timestamp>, now: SystemTime) -> Option<Duration> {
    let until = SystemTime::try_from(*until?).ok()?;
    until.duration_since(now).ok().filter(|d| !d.is_zero())
}

/// The first 8 characters of a lease id: enough to tell leases apart on one screen.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// `in_flight/effective/limit`.
pub fn usage(p: &pb::PoolStatus) -> String {
    format!("{}/{}/{}", p.in_flight, p.effective_limit, p.limit)
}

/// The pause column: `12s (reason)` while paused; `by global 30s (reason)` while a paused ancestor
/// blocks the pool; both, comma-separated, when both hold; `-` otherwise.
pub fn pause_text(p: &pb::PoolStatus, now: SystemTime) -> String {
    let own = remaining(p.paused_until.as_ref(), now).map(|left| with_reason(left, &p.pause_reason));
    let inherited =
        inherited_pause(p, now).map(|(b, left)| format!("by {} {}", b.pool, with_reason(left, &b.reason)));
    match (own, inherited) {
        (None, None) => "-".to_owned(),
        (Some(one), None) | (None, Some(one)) => one,
        (Some(own), Some(inherited)) => format!("{own}, {inherited}"),
    }
}

/// The ancestor pause blocking `p` and how long it has left, while it lasts.
pub fn inherited_pause(p: &pb::PoolStatus, now: SystemTime) -> Option<(&pb::PauseInherited, Duration)> {
    let b = p.blocked_by.as_ref()?;
    Some((b, remaining(b.until.as_ref(), now)?))
}

/// `12s` or `12s (reason)`.
fn with_reason(left: Duration, reason: &str) -> String {
    if reason.is_empty() {
        fmt_duration(left)
    } else {
        format!("{} ({})", fmt_duration(left), ellipsize(reason, MAX_REASON))
    }
}

/// The longest pause reason shown in a table cell (the full text is in `--output json`).
pub const MAX_REASON: usize = 40;

/// `s` cut to `max` characters, ending in "…" when cut.
pub fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn align(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The learning line (after a crash restart or a failover): which pools grant only re-presented
/// leases, how many of the expected leases are back and how long each may still learn.
fn learning_text(s: &pb::StatusResponse, now: SystemTime) -> String {
    let pools: Vec<String> = s
        .pools
        .iter()
        .filter_map(|p| {
            let left = fmt_duration(remaining(p.learning_until.as_ref(), now)?);
            Some(match p.learning_expected {
                Some(n) => format!("{} ({}/{n} back, at most {left})", p.name, p.learning_back),
                None => format!("{} (at most {left})", p.name),
            })
        })
        .collect();
    if pools.is_empty() {
        "learning period: every pool has its leases back and grants again\n".to_owned()
    } else {
        format!("learning period, only re-presented leases are granted on: {}\n", pools.join(", "))
    }
}

/// `slotctl status` as text: a pool table, a lease table and any daemon-wide state.
pub fn render_status(s: &pb::StatusResponse, now: SystemTime) -> String {
    let mut out = String::new();
    if s.shutting_down {
        out.push_str("daemon is shutting down\n");
    }
    if s.learning {
        out.push_str(&learning_text(s, now));
    }
    let pools: Vec<Vec<String>> = s
        .pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                if p.parent.is_empty() { "-".to_owned() } else { p.parent.clone() },
                usage(p),
                p.queued.to_string(),
                pause_text(p, now),
                p.cooling.to_string(),
            ]
        })
        .collect();
    out.push_str(&align(&["POOL", "PARENT", "IN_FLIGHT/EFF/LIMIT", "QUEUED", "PAUSED", "COOLING"], &pools));
    out.push('\n');
    if s.leases.is_empty() {
        out.push_str("no leases\n");
        return out;
    }
    let leases: Vec<Vec<String>> = s
        .leases
        .iter()
        .map(|l| {
            vec![
                short_id(&l.lease_id).to_owned(),
                l.pool.clone(),
                if l.holder.is_empty() { "-".to_owned() } else { l.holder.clone() },
                l.priority.to_string(),
                fmt_duration(from_wire(l.age.as_ref())),
                fmt_duration(from_wire(l.expires_in.as_ref())),
                l.fencing_token.to_string(),
            ]
        })
        .collect();
    out.push_str(&align(&["LEASE", "POOL", "HOLDER", "PRI", "AGE", "EXPIRES_IN", "TOKEN"], &leases));
    out
}

/// The role line of `slotctl status` (high availability); empty for a single daemon.
pub fn render_ha(ha: Option<&crate::conn::HaRole>) -> String {
    ha.map_or_else(String::new, |h| format!("role: {}, epoch {}, member {}\n", h.role, h.epoch, h.member))
}

/// `status_json` with `"ha": {"role", "epoch", "member"}` added when the daemon reported them.
pub fn with_ha(json_text: &str, ha: Option<&crate::conn::HaRole>) -> String {
    let Some(h) = ha else { return json_text.to_owned() };
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(json_text) else { return json_text.to_owned() };
    v["ha"] = json!({ "role": h.role, "epoch": h.epoch, "member": h.member });
    let mut text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| json_text.to_owned());
    text.push('\n');
    text
}

/// `slotctl status --output json`: one pretty-printed object, durations in milliseconds.
pub fn status_json(s: &pb::StatusResponse, now: SystemTime) -> String {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let pools: Vec<_> = s
        .pools
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "parent": if p.parent.is_empty() { None } else { Some(&p.parent) },
                "limit": p.limit,
                "effective_limit": p.effective_limit,
                "in_flight": p.in_flight,
                "queued": p.queued,
                "paused_for_ms": remaining(p.paused_until.as_ref(), now).map(ms),
                "pause_reason": if p.pause_reason.is_empty() { None } else { Some(&p.pause_reason) },
                "blocked_by": inherited_pause(p, now).map(|(b, left)| json!({
                    "pool": b.pool,
                    "for_ms": ms(left),
                    "reason": b.reason,
                })),
                "cooling": p.cooling,
                "next_fencing_token": p.next_fencing_token,
            })
        })
        .collect();
    let leases: Vec<_> = s
        .leases
        .iter()
        .map(|l| {
            json!({
                "lease_id": l.lease_id,
                "pool": l.pool,
                "holder": l.holder,
                "priority": l.priority,
                "age_ms": ms(from_wire(l.age.as_ref())),
                "expires_in_ms": ms(from_wire(l.expires_in.as_ref())),
                "fencing_token": l.fencing_token,
            })
        })
        .collect();
    let v = json!({
        "pools": pools,
        "leases": leases,
        "learning": s.learning,
        "shutting_down": s.shutting_down,
    });
    let mut text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_ha_role_is_shown_when_reported() {
        let ha =
            crate::conn::HaRole { role: "leader".into(), epoch: 7, member: "http://10.0.0.2:50051".into() };
        assert_eq!(render_ha(Some(&ha)), "role: leader, epoch 7, member http://10.0.0.2:50051\n");
        assert_eq!(render_ha(None), "");
        let v: serde_json::Value = serde_json::from_str(&with_ha("{\"pools\": []}", Some(&ha))).unwrap();
        assert_eq!((v["ha"]["role"].as_str(), v["ha"]["epoch"].as_u64()), (Some("leader"), Some(7)));
        assert_eq!(v["ha"]["member"].as_str(), Some("http://10.0.0.2:50051"));
        assert_eq!(with_ha("{}", None), "{}");
    }

    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(fmt_duration(Duration::from_millis(4_250)), "4.2s");
        assert_eq!(fmt_duration(Duration::from_secs(30)), "30s");
        assert_eq!(fmt_duration(Duration::from_secs(303)), "5m03s");
        assert_eq!(fmt_duration(Duration::from_secs(7_500)), "2h05m");
    }

    #[test]
    fn tables_align_and_show_pauses() {
        let now = SystemTime::now();
        let s = pb::StatusResponse {
            pools: vec![pb::PoolStatus {
                name: "anthropic".into(),
                limit: 4,
                effective_limit: 3,
                in_flight: 2,
                queued: 1,
                paused_until: Some((now + Duration::from_millis(30_400)).into()),
                pause_reason: "429".into(),
                ..Default::default()
            }],
            leases: vec![pb::LeaseStatus {
                lease_id: "0123456789abcdef0123456789abcdef".into(),
                pool: "anthropic".into(),
                holder: "agent".into(),
                priority: 5,
                fencing_token: 7,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render_status(&s, now);
        assert!(text.contains("anthropic  -       2/3/4"), "{text}");
        assert!(text.contains("30s (429)"), "{text}");
        assert!(text.contains("01234567  anthropic  agent"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&status_json(&s, now)).expect("valid json");
        assert_eq!(v["pools"][0]["in_flight"], 2);
    }

    #[test]
    fn learning_names_the_pools_still_learning() {
        let now = SystemTime::now();
        let until = Some((now + Duration::from_millis(90_300)).into());
        let counted = pb::PoolStatus {
            name: "anthropic".into(),
            learning_until: until,
            learning_expected: Some(3),
            learning_back: 1,
            ..Default::default()
        };
        let uncounted = pb::PoolStatus { name: "openai".into(), learning_until: until, ..Default::default() };
        let done = pb::PoolStatus { name: "local".into(), ..Default::default() };
        let mut s = pb::StatusResponse {
            learning: true,
            pools: vec![counted, uncounted, done],
            ..Default::default()
        };
        let text = render_status(&s, now);
        assert!(
            text.starts_with(
                "learning period, only re-presented leases are granted on: anthropic (1/3 back, at most \
                 1m30s), openai (at most 1m30s)\n"
            ),
            "{text}"
        );
        s.pools.truncate(0);
        assert!(render_status(&s, now).starts_with("learning period: every pool has its leases back"));
        s.learning = false;
        assert!(!render_status(&s, now).contains("learning"));
    }

    #[test]
    fn a_pause_inherited_from_an_ancestor_shows_which_one_and_for_how_long() {
        let now = SystemTime::now();
        let blocked_by = |secs| {
            Some(pb::PauseInherited {
                pool: "global".into(),
                until: Some((now + Duration::from_secs(secs)).into()),
                reason: "paused by an operator: incident".into(),
            })
        };
        let child = pb::PoolStatus {
            name: "anthropic".into(),
            parent: "global".into(),
            limit: 4,
            effective_limit: 4,
            blocked_by: blocked_by(90),
            ..Default::default()
        };
        let both = pb::PoolStatus {
            name: "opus".into(),
            parent: "anthropic".into(),
            limit: 2,
            effective_limit: 2,
            paused_until: Some((now + Duration::from_millis(12_300)).into()),
            pause_reason: "429".into(),
            blocked_by: blocked_by(90),
            ..Default::default()
        };
        let over = pb::PoolStatus { name: "past".into(), blocked_by: blocked_by(0), ..Default::default() };
        let s = pb::StatusResponse { pools: vec![child, both, over], ..Default::default() };
        let text = render_status(&s, now);
        let row = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{text}"));
        assert!(row("anthropic").contains("  by global 1m30s (paused by an operator: incident)  "), "{text}");
        assert!(row("opus").contains("  12s (429), by global 1m30s (paused"), "{text}");
        assert!(row("past").contains(" -  "), "an ended pause shows as none: {text}");

        let v: serde_json::Value = serde_json::from_str(&status_json(&s, now)).expect("valid json");
        assert_eq!(v["pools"][0]["blocked_by"]["pool"], "global");
        assert_eq!(v["pools"][0]["blocked_by"]["for_ms"].as_u64().map(|ms| ms.div_ceil(1000)), Some(90));
        assert!(v["pools"][2]["blocked_by"].is_null());
    }
}
