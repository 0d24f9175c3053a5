//! `slotctl top`: a live view of the daemon.
//!
//! Per pool: a bar of in-flight leases against the limit, the queue depth and a pause countdown; below,
//! the most recent events. Events come from `Admin.Watch` when the daemon serves it; otherwise (or
//! when the watch breaks) they are derived from the difference between Status snapshots, which are
//! polled every [`POLL_INTERVAL`] either way to keep the bars exact.
//!
//! [`draw`] is a pure function of [`App`] (the clock included: [`App::now`]), so a frame can be
//! rendered and checked with ratatui's `TestBackend`; [`run`] only feeds the `App` and redraws.

use std::{
    collections::{HashMap, VecDeque},
    io::IsTerminal,
    time::{Duration, SystemTime},
};

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Gauge, List, ListItem, Paragraph},
};
use slotd_proto::v1::{self as pb, watch_event::Event as WatchKind};
use tokio::sync::mpsc;

use super::{
    CtlError,
    conn::Conn,
    error::code_name,
    table::{ellipsize, fmt_duration, inherited_pause, remaining, short_id},
};

/// How often Status is polled for the bars (and for events when Watch is unavailable).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often the screen is redrawn when nothing happens (the countdowns move).
pub const REDRAW_INTERVAL: Duration = Duration::from_millis(250);
/// The longest wait before trying Watch again after it broke (not after UNIMPLEMENTED: never again).
pub const WATCH_RETRY: Duration = Duration::from_secs(5);
/// How soon `Admin.Watch` is called again after an open stream ended (the member died or stepped
/// down): the call follows the leader, or moves to the next endpoint. It is tried this often
/// [`WATCH_FOLLOW_TRIES`] times (an election takes about the daemon's `[ha] lease_ttl`), then with
/// a doubling wait up to [`WATCH_RETRY`].
pub const WATCH_FOLLOW: Duration = Duration::from_millis(250);
/// How many quick tries follow the end of an open Watch stream: 10 s of them.
pub const WATCH_FOLLOW_TRIES: u32 = 40;
/// The most events kept.
pub const MAX_EVENTS: usize = 200;

/// Where the events shown come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSource {
    /// Not known yet.
    Connecting,
    /// The daemon's `Admin.Watch` stream.
    Watch,
    /// Differences between polled Status snapshots, with why Watch is not used.
    Polling {
        /// Why (for example "Admin.Watch: UNIMPLEMENTED").
        why: String,
    },
}

/// What kind of event a line shows (it picks the colour).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A lease was granted.
    Granted,
    /// A lease was released.
    Released,
    /// A lease expired or was revoked.
    Expired,
    /// A pool was paused.
    Paused,
    /// A pool's pause ended.
    Resumed,
    /// A pool was created, changed or removed.
    Limit,
    /// A request was rejected.
    Rejected,
    /// Provider health: a slot held after a failure, a circuit breaker's transition.
    Health,
    /// Anything else (connection changes).
    Info,
}

/// One line of the event list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When it happened.
    pub at: SystemTime,
    /// What kind.
    pub kind: EventKind,
    /// The text shown.
    pub text: String,
}

/// Everything the screen shows.
#[derive(Debug, Clone)]
pub struct App {
    /// The daemon's endpoint (shown in the title).
    pub endpoint: String,
    /// The latest snapshot.
    pub status: pb::StatusResponse,
    /// Most recent first, at most [`MAX_EVENTS`].
    pub events: VecDeque<Event>,
    /// Where events come from.
    pub source: EventSource,
    /// The clock the countdowns are computed against.
    pub now: SystemTime,
    /// The last Status error, until a poll succeeds again.
    pub error: Option<String>,
    /// True once a snapshot arrived (differences are only taken between two real snapshots).
    pub has_snapshot: bool,
}

impl App {
    /// An empty view of `endpoint`.
    pub fn new(endpoint: impl Into<String>, now: SystemTime) -> Self {
        App {
            endpoint: endpoint.into(),
            status: pb::StatusResponse::default(),
            events: VecDeque::new(),
            source: EventSource::Connecting,
            now,
            error: None,
            has_snapshot: false,
        }
    }

    /// Adds an event at the top of the list.
    pub fn push_event(&mut self, at: SystemTime, kind: EventKind, text: impl Into<String>) {
        self.events.push_front(Event { at, kind, text: text.into() });
        self.events.truncate(MAX_EVENTS);
    }

    /// Applies a polled snapshot. Unless events come from Watch, the differences become events.
    pub fn apply_status(&mut self, s: pb::StatusResponse, now: SystemTime) {
        self.now = now;
        self.error = None;
        if self.has_snapshot && self.source != EventSource::Watch {
            for (kind, text) in snapshot_events(&self.status, &s, now) {
                self.push_event(now, kind, text);
            }
        }
        self.status = s;
        self.has_snapshot = true;
    }

    /// Applies one `Admin.Watch` event.
    pub fn apply_watch(&mut self, ev: pb::WatchEvent, now: SystemTime) {
        let at = ev.at.and_then(|t| SystemTime::try_from(t).ok()).unwrap_or(now);
        let Some(event) = ev.event else { return };
        let lease = |c: &pb::LeaseChange, verb: &str| {
            let mut text = format!("{verb} {} lease {}", c.pool, short_id(&c.lease_id));
            if !c.holder.is_empty() {
                text.push_str(if verb == "granted" { " to " } else { " of " });
                text.push_str(&c.holder);
            }
            if !c.detail.is_empty() {
                text.push_str(&format!(" ({})", c.detail));
            }
            text
        };
        let pool = |c: &pb::PoolChange, verb: &str| {
            if c.detail.is_empty() {
                format!("{verb} {}", c.pool)
            } else {
                format!("{verb} {}: {}", c.pool, c.detail)
            }
        };
        let (kind, text, change) = match event {
            WatchKind::Snapshot(s) => {
                self.status = s;
                self.has_snapshot = true;
                return;
            }
            WatchKind::Granted(c) => (EventKind::Granted, lease(&c, "granted"), None),
            WatchKind::Released(c) => (EventKind::Released, lease(&c, "released"), None),
            WatchKind::Expired(c) => (EventKind::Expired, lease(&c, "expired"), None),
            WatchKind::Paused(c) => (EventKind::Paused, pool(&c, "paused"), Some(c)),
            WatchKind::Resumed(c) => (EventKind::Resumed, pool(&c, "resumed"), Some(c)),
            WatchKind::LimitChanged(c) => (EventKind::Limit, pool(&c, "changed"), Some(c)),
            WatchKind::Rejected(c) => (EventKind::Rejected, pool(&c, "rejected on"), Some(c)),
            WatchKind::Budget(c) => {
                self.push_event(at, EventKind::Limit, format!("budget {}: {}", c.pool, c.detail));
                return;
            }
            WatchKind::Held(c) => (EventKind::Health, pool(&c, "held on"), Some(c)),
            WatchKind::Breaker(c) => (EventKind::Health, pool(&c, "on"), Some(c)),
        };
        if let Some(c) = change {
            self.update_pool(&c.pool, c.status);
        }
        self.push_event(at, kind, text);
    }

    fn update_pool(&mut self, name: &str, status: Option<pb::PoolStatus>) {
        let pools = &mut self.status.pools;
        match (pools.iter().position(|p| p.name == name), status) {
            (Some(i), Some(s)) => pools[i] = s,
            (Some(_), None) => {}
            (None, Some(s)) => pools.push(s),
            (None, None) => {}
        }
    }
}

/// The events that explain how `old` became `new` (for when Watch is not available).
pub fn snapshot_events(
    old: &pb::StatusResponse,
    new: &pb::StatusResponse,
    now: SystemTime,
) -> Vec<(EventKind, String)> {
    let mut out = Vec::new();
    let old_pools: HashMap<&str, &pb::PoolStatus> = old.pools.iter().map(|p| (p.name.as_str(), p)).collect();
    let new_pools: HashMap<&str, &pb::PoolStatus> = new.pools.iter().map(|p| (p.name.as_str(), p)).collect();
    for p in &new.pools {
        match old_pools.get(p.name.as_str()) {
            None => out.push((EventKind::Limit, format!("created {} (limit {})", p.name, p.limit))),
            Some(o) => {
                if (o.limit, o.effective_limit) != (p.limit, p.effective_limit) {
                    out.push((
                        EventKind::Limit,
                        format!(
                            "changed {}: limit {} -> {}, effective {} -> {}",
                            p.name, o.limit, p.limit, o.effective_limit, p.effective_limit
                        ),
                    ));
                }
                let was = remaining(o.paused_until.as_ref(), now).is_some();
                let is = remaining(p.paused_until.as_ref(), now);
                match is {
                    Some(left) if !was || o.paused_until != p.paused_until => {
                        let why = if p.pause_reason.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", p.pause_reason)
                        };
                        out.push((
                            EventKind::Paused,
                            format!("paused {} for {}{why}", p.name, fmt_duration(left)),
                        ));
                    }
                    None if was => out.push((EventKind::Resumed, format!("resumed {}", p.name))),
                    _ => {}
                }
            }
        }
    }
    for o in &old.pools {
        if !new_pools.contains_key(o.name.as_str()) {
            out.push((EventKind::Limit, format!("removed {}", o.name)));
        }
    }
    let old_leases: HashMap<&str, &pb::LeaseStatus> =
        old.leases.iter().map(|l| (l.lease_id.as_str(), l)).collect();
    let new_leases: HashMap<&str, &pb::LeaseStatus> =
        new.leases.iter().map(|l| (l.lease_id.as_str(), l)).collect();
    for l in &new.leases {
        if !old_leases.contains_key(l.lease_id.as_str()) {
            out.push((
                EventKind::Granted,
                format!("granted {} lease {} to {}", l.pool, short_id(&l.lease_id), l.holder),
            ));
        }
    }
    for l in &old.leases {
        if !new_leases.contains_key(l.lease_id.as_str()) {
            out.push((
                EventKind::Released,
                format!("ended {} lease {} of {}", l.pool, short_id(&l.lease_id), l.holder),
            ));
        }
    }
    out
}

/// The pools in tree order (each child right under its parent, siblings in the daemon's order) with
/// their depth (0 for roots). Pools whose parent is missing are shown as roots.
pub fn tree_order(pools: &[pb::PoolStatus]) -> Vec<(&pb::PoolStatus, usize)> {
    let known: std::collections::HashSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    let is_root = |p: &pb::PoolStatus| p.parent.is_empty() || !known.contains(p.parent.as_str());
    let mut out = Vec::with_capacity(pools.len());
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<(&pb::PoolStatus, usize)> =
        pools.iter().filter(|p| is_root(p)).rev().map(|p| (p, 0)).collect();
    while let Some((p, depth)) = stack.pop() {
        // A cycle (refused by the daemon anyway) must not loop forever.
        if !seen.insert(p.name.as_str()) {
            continue;
        }
        out.push((p, depth));
        stack
            .extend(pools.iter().filter(|c| c.parent == p.name && !is_root(c)).rev().map(|c| (c, depth + 1)));
    }
    // Anything unreachable (only in a cycle) still gets a row.
    out.extend(pools.iter().filter(|p| !seen.contains(p.name.as_str())).map(|p| (p, 0)));
    out
}

/// Draws the whole screen from `app`.
pub fn draw(frame: &mut Frame<'_>, app: &App) {
    let area = frame.area();
    let pools_height = u16::try_from(app.status.pools.len().max(1) + 2).unwrap_or(u16::MAX);
    let pools_height = pools_height.min(area.height.saturating_sub(4).max(3));
    let [title, pools, events] =
        Layout::vertical([Constraint::Length(1), Constraint::Length(pools_height), Constraint::Min(3)])
            .areas(area);
    draw_title(frame, title, app);
    draw_pools(frame, pools, app);
    draw_events(frame, events, app);
}

fn draw_title(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let source = match &app.source {
        EventSource::Connecting => "connecting".to_owned(),
        EventSource::Watch => "watch".to_owned(),
        EventSource::Polling { why } => format!("polling ({why})"),
    };
    let mut spans = vec![
        Span::styled("slotctl top ", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(format!(" {}  leases {}  events: {source}", app.endpoint, app.status.leases.len())),
    ];
    if app.status.shutting_down {
        spans.push(Span::styled("  SHUTTING DOWN", Style::default().fg(Color::Red)));
    }
    if app.status.learning {
        spans.push(Span::styled("  learning", Style::default().fg(Color::Yellow)));
    }
    if let Some(e) = &app.error {
        spans.push(Span::styled(format!("  error: {e}"), Style::default().fg(Color::Red)));
    }
    spans.push(Span::styled("  q quits", Style::default().fg(Color::DarkGray)));
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_pools(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let block = Block::default().borders(Borders::ALL).title(" pools ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let pools = &app.status.pools;
    if pools.is_empty() {
        let text = if app.has_snapshot { "no pools" } else { "waiting for the daemon..." };
        frame.render_widget(Paragraph::new(text), inner);
        return;
    }
    let ordered = tree_order(pools);
    let names: Vec<String> =
        ordered.iter().map(|(p, depth)| format!("{}{}", "  ".repeat(*depth), p.name)).collect();
    let name_width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0).clamp(4, 32) as u16 + 1;
    for (i, ((p, _), name)) in ordered.iter().zip(&names).enumerate() {
        let Ok(row) = u16::try_from(i) else { break };
        if row >= inner.height {
            break;
        }
        let line = Rect { y: inner.y + row, height: 1, ..inner };
        let budget = budget_label(p);
        let [name_area, bar_area, queue_area, pause_area, budget_area] = Layout::horizontal([
            Constraint::Length(name_width),
            Constraint::Min(10),
            Constraint::Length(11),
            Constraint::Length(PAUSE_WIDTH),
            Constraint::Length(budget.as_ref().map_or(0, |b| b.chars().count() as u16)),
        ])
        .areas(line);
        if let Some(b) = budget {
            let colour = if b.contains("debt") { Color::Red } else { Color::Reset };
            frame.render_widget(Paragraph::new(Span::styled(b, Style::default().fg(colour))), budget_area);
        }
        frame.render_widget(Paragraph::new(name.as_str()), name_area);

        let paused = pause_label(p, app.now);
        let ratio =
            if p.limit == 0 { 0.0 } else { (f64::from(p.in_flight) / f64::from(p.limit)).clamp(0.0, 1.0) };
        let colour = if paused.is_some() {
            Color::Red
        } else if p.in_flight >= p.effective_limit {
            Color::Yellow
        } else {
            Color::Green
        };
        let mut label = format!("{}/{}", p.in_flight, p.limit);
        if p.effective_limit < p.limit {
            label.push_str(&format!(" (eff {})", p.effective_limit));
        }
        let gauge = Gauge::default()
            .gauge_style(Style::default().fg(colour).bg(Color::Black))
            .ratio(ratio)
            .use_unicode(true)
            .label(label);
        frame.render_widget(gauge, bar_area);
        frame.render_widget(Paragraph::new(format!(" queued {}", p.queued)), queue_area);
        let pause = match (paused, health_label(p, app.now)) {
            (Some(text), _) | (None, Some(text)) => Span::styled(text, Style::default().fg(Color::Red)),
            (None, None) if p.cooling > 0 => Span::raw(format!(" cooling {}", p.cooling)),
            (None, None) => Span::raw(""),
        };
        frame.render_widget(Paragraph::new(Line::from(pause)), pause_area);
    }
}

/// A pool row's budget cell: each budget's level / refill per window, its debt while in debt, the
/// open reservations, and "shadow" in shadow mode; for example ` req 3/20 in 1.2k/4k out debt 300 res 2`.
pub fn budget_label(p: &pb::PoolStatus) -> Option<String> {
    let b = p.budget.as_ref().filter(|b| !b.levels.is_empty())?;
    let mut out = String::new();
    for l in &b.levels {
        let name = match pb::BudgetKind::try_from(l.kind) {
            Ok(pb::BudgetKind::Requests) => "req",
            Ok(pb::BudgetKind::InputTokens) => "in",
            Ok(pb::BudgetKind::OutputTokens) => "out",
            _ => continue,
        };
        if l.debt > 0 {
            out.push_str(&format!(" {name} debt {}", si(l.debt)));
        } else {
            out.push_str(&format!(" {name} {}/{}", si(l.level.max(0).unsigned_abs()), si(l.refill)));
        }
    }
    if b.reservations > 0 {
        out.push_str(&format!(" res {}", b.reservations));
    }
    if b.shadow {
        out.push_str(" shadow");
    }
    Some(out)
}

/// `1234` as `1.2k`, `2500000` as `2.5M`: budget figures in a narrow cell.
fn si(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

/// A pool row's provider-health cell: its breaker when not closed (` breaker open 12s`, ` breaker
/// half-open, probing`), else its held slots (` held 2 for 5s`).
pub fn health_label(p: &pb::PoolStatus, now: SystemTime) -> Option<String> {
    let b = p.breaker.as_ref();
    let forced = if b.is_some_and(|b| b.forced) { " (forced)" } else { "" };
    match b.map(|b| pb::BreakerState::try_from(b.state).unwrap_or_default()) {
        Some(pb::BreakerState::Open) => {
            return Some(match remaining(b.and_then(|b| b.open_until.as_ref()), now) {
                Some(left) => format!(" breaker open {}{forced}", fmt_duration(left)),
                None => format!(" breaker open{forced}"),
            });
        }
        Some(pb::BreakerState::HalfOpen) => {
            let probing = b.is_some_and(|b| !b.probe_lease_id.is_empty());
            return Some(format!(" breaker half-open{}", if probing { ", probing" } else { "" }));
        }
        _ => {}
    }
    (p.held > 0).then(|| match remaining(p.held_until.as_ref(), now) {
        Some(left) => format!(" held {} for {}", p.held, fmt_duration(left)),
        None => format!(" held {}", p.held),
    })
}

/// The width of a pool row's pause cell: room for " paused by <pool> 5m03s".
const PAUSE_WIDTH: u16 = 28;

/// A pool row's pause cell while it is blocked: ` paused 12s` for its own pause, ` paused by global
/// 30s` when a paused ancestor blocks it for longer.
fn pause_label(p: &pb::PoolStatus, now: SystemTime) -> Option<String> {
    let own = remaining(p.paused_until.as_ref(), now);
    match (own, inherited_pause(p, now)) {
        (Some(own), Some((_, left))) if own >= left => Some(format!(" paused {}", fmt_duration(own))),
        (_, Some((b, left))) => {
            // The name gets what is left of the cell after " paused by " and the countdown.
            let name = ellipsize(&b.pool, usize::from(PAUSE_WIDTH) - 18);
            Some(format!(" paused by {name} {}", fmt_duration(left)))
        }
        (Some(own), None) => Some(format!(" paused {}", fmt_duration(own))),
        (None, None) => None,
    }
}

fn draw_events(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let block = Block::default().borders(Borders::ALL).title(" recent events ");
    let items: Vec<ListItem<'_>> = app
        .events
        .iter()
        .take(usize::from(area.height))
        .map(|e| {
            let ago = fmt_duration(app.now.duration_since(e.at).unwrap_or_default());
            let colour = match e.kind {
                EventKind::Granted => Color::Green,
                EventKind::Released => Color::Reset,
                EventKind::Expired | EventKind::Rejected => Color::Magenta,
                EventKind::Paused | EventKind::Health => Color::Red,
                EventKind::Resumed => Color::Cyan,
                EventKind::Limit => Color::Yellow,
                EventKind::Info => Color::DarkGray,
            };
            ListItem::new(Line::from(vec![
                Span::styled(format!("{ago:>7} ago  "), Style::default().fg(Color::DarkGray)),
                Span::styled(e.text.clone(), Style::default().fg(colour)),
            ]))
        })
        .collect();
    frame.render_widget(List::new(items).block(block), area);
}

/// What the background tasks tell the screen.
#[derive(Debug)]
pub enum Msg {
    /// A snapshot and the member that answered it.
    Status(Result<(pb::StatusResponse, String), CtlError>),
    /// `Admin.Watch` is open (again).
    WatchUp,
    /// An event from `Admin.Watch`.
    Watch(Box<pb::WatchEvent>),
    /// `Admin.Watch` ended or could not be opened; it is tried again (on the leader) after a pause.
    WatchDown { why: String },
    /// A quit key was pressed.
    Quit,
}

/// Restores the terminal however `run` ends.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Fails unless stdout is a terminal (checked before connecting, so scripts get the useful message).
pub fn require_terminal() -> Result<(), CtlError> {
    if std::io::stdout().is_terminal() {
        Ok(())
    } else {
        Err(CtlError::new("slotctl top needs a terminal; use `slotctl status` in scripts"))
    }
}

/// Runs the live view until q, Esc or ctrl-c.
///
/// # Cancel safety
/// Dropping the future restores the terminal and stops the background polls; the keyboard thread ends
/// within 100 ms.
pub async fn run(conn: Conn, pool: Option<String>) -> Result<(), CtlError> {
    require_terminal()?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let poller = tokio::spawn(poll_status(conn.clone(), pool.clone(), tx.clone()));
    let watcher = tokio::spawn(watch_events(conn.clone(), pool, tx.clone()));
    let keys = tx.clone();
    std::thread::spawn(move || read_keys(&keys));
    drop(tx);

    let mut terminal =
        ratatui::try_init().map_err(|e| CtlError::new(format!("cannot set up the terminal: {e}")))?;
    let _guard = TerminalGuard;
    let mut app = App::new(conn.endpoint(), SystemTime::now());
    let mut redraw = tokio::time::interval(REDRAW_INTERVAL);
    let result = loop {
        if let Err(e) = terminal.draw(|f| draw(f, &app)) {
            break Err(CtlError::new(format!("drawing: {e}")));
        }
        tokio::select! {
            _ = redraw.tick() => app.now = SystemTime::now(),
            msg = rx.recv() => {
                let now = SystemTime::now();
                app.now = now;
                match msg {
                    None | Some(Msg::Quit) => break Ok(()),
                    Some(Msg::Status(Ok((s, member)))) => {
                        app.endpoint = member;
                        app.apply_status(s, now);
                    }
                    Some(Msg::Status(Err(e))) => app.error = Some(e.to_string()),
                    Some(Msg::WatchUp) => {
                        app.source = EventSource::Watch;
                        app.push_event(now, EventKind::Info, "watching events (Admin.Watch)");
                    }
                    Some(Msg::Watch(ev)) => app.apply_watch(*ev, now),
                    Some(Msg::WatchDown { why }) => {
                        if app.source != (EventSource::Polling { why: why.clone() }) {
                            app.push_event(now, EventKind::Info, format!("events from Status polling: {why}"));
                        }
                        app.source = EventSource::Polling { why };
                    }
                }
            }
        }
    };
    poller.abort();
    watcher.abort();
    result
}

async fn poll_status(conn: Conn, pool: Option<String>, tx: mpsc::UnboundedSender<Msg>) {
    let mut every = tokio::time::interval(POLL_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let req = pb::StatusRequest { pool: pool.clone().unwrap_or_default() };
        let res = conn
            .call(|mut s, _| {
                let r = req.clone();
                async move { s.status(r).await }
            })
            .await
            .map(|(r, member)| (r.into_inner(), member))
            .map_err(CtlError::from);
        if tx.send(Msg::Status(res)).is_err() {
            return;
        }
    }
}

/// Follows `Admin.Watch` for `top`: sends every event to `tx`, and re-opens the stream on the leader
/// after it ends (a member that died or stepped down), until `tx` is closed or the daemon does not
/// serve Watch.
///
/// # Cancel safety
/// Cancel safe: it only reads; dropping it closes the stream.
pub async fn watch_events(conn: Conn, pool: Option<String>, tx: mpsc::UnboundedSender<Msg>) {
    let (mut retry, mut quick) = (WATCH_RETRY, 0);
    loop {
        let req = pb::WatchRequest { pool: pool.clone().unwrap_or_default(), snapshot_interval: None };
        let why = match conn
            .call(|_, mut a| {
                let r = req.clone();
                async move { a.watch(r).await }
            })
            .await
        {
            Ok((stream, _)) => {
                let mut stream = stream.into_inner();
                if tx.send(Msg::WatchUp).is_err() {
                    return;
                }
                // Once open, a stream that ends means the member went away or stepped down (a
                // deposed leader ends its streams): look for the leader soon.
                (retry, quick) = (WATCH_FOLLOW, WATCH_FOLLOW_TRIES);
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            if tx.send(Msg::Watch(Box::new(ev))).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break "Admin.Watch ended".to_owned(),
                        Err(s) => break format!("Admin.Watch: {}", code_name(s.code())),
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                let _ = tx.send(Msg::WatchDown { why: "Admin.Watch not served".to_owned() });
                return;
            }
            Err(s) => format!("Admin.Watch: {}", code_name(s.code())),
        };
        if tx.send(Msg::WatchDown { why }).is_err() {
            return;
        }
        if quick > 0 {
            quick -= 1;
        } else {
            retry = (retry * 2).min(WATCH_RETRY);
        }
        tokio::time::sleep(retry).await;
    }
}

/// Reads the keyboard on its own thread (crossterm's reads block) until a quit key or the screen is gone.
fn read_keys(tx: &mpsc::UnboundedSender<Msg>) {
    use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
    while !tx.is_closed() {
        match event::poll(Duration::from_millis(100)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return,
        }
        let Ok(TermEvent::Key(key)) = event::read() else { continue };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        let quit = matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
            || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL));
        if quit {
            let _ = tx.send(Msg::Quit);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratatui::{Terminal, backend::TestBackend};

    use super::*;

    #[test]
    fn a_pool_blocked_by_its_parents_pause_shows_as_paused_by_it() {
        let now = SystemTime::now();
        let pool = |name: &str, parent: &str| pb::PoolStatus {
            name: name.into(),
            parent: parent.into(),
            limit: 2,
            effective_limit: 2,
            ..Default::default()
        };
        let global = pb::PoolStatus {
            paused_until: Some((now + Duration::from_secs(45)).into()),
            pause_reason: "paused by an operator".into(),
            ..pool("global", "")
        };
        let blocked_by = Some(pb::PauseInherited {
            pool: "global".into(),
            until: Some((now + Duration::from_secs(45)).into()),
            reason: "paused by an operator".into(),
        });
        let anthropic = pb::PoolStatus { blocked_by: blocked_by.clone(), ..pool("anthropic", "global") };
        // Its own pause ends later than the inherited one: that is the one shown.
        let opus = pb::PoolStatus {
            paused_until: Some((now + Duration::from_secs(90)).into()),
            blocked_by,
            ..pool("opus", "anthropic")
        };
        let mut app = App::new("http://127.0.0.1:50051", now);
        let status = pb::StatusResponse { pools: vec![global, anthropic, opus], ..Default::default() };
        app.apply_status(status, now);

        let mut terminal = Terminal::new(TestBackend::new(100, 12)).expect("terminal");
        terminal.draw(|f| draw(f, &app)).expect("draw");
        let buf = terminal.backend().buffer();
        let rows: Vec<String> = (0..buf.area.height)
            .map(|y| (0..buf.area.width).map(|x| buf[(x, y)].symbol().to_owned()).collect())
            .collect();
        let screen = rows.join("\n");
        let row = |name: &str| rows.iter().find(|r| r.contains(name)).unwrap_or_else(|| panic!("{screen}"));
        assert!(row("global ").contains("paused 45s"), "{screen}");
        assert!(row("  anthropic").contains("paused by global 45s"), "{screen}");
        assert!(row("    opus").contains("paused 1m30s"), "{screen}");
        assert!(!row("    opus").contains("by global"), "{screen}");
    }
}
