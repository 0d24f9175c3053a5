//! The Admin-service commands: `pool set|rm`, `pause`, `resume`, `revoke`, `drain`, `undrain`.
//!
//! Each is one RPC (`drain` reads a stream) and prints one short confirmation line. Every call goes
//! through [`Conn::call`], so it reaches the leader of a highly available deployment.

use std::time::{Duration, SystemTime};

use serde_json::json;
use slotd_proto::v1 as pb;

use super::{
    CtlError,
    cli::{BreakerTo, Output, PoolSetArgs},
    conn::Conn,
    table::{fmt_duration, remaining, usage},
};

fn wire(d: Duration) -> Result<prost_types::Duration, CtlError> {
    prost_types::Duration::try_from(d)
        .map_err(|_| CtlError::with_code(format!("duration {d:?} is too long"), tonic::Code::InvalidArgument))
}

fn wire_opt(d: Option<Duration>) -> Result<Option<prost_types::Duration>, CtlError> {
    d.map(wire).transpose()
}

/// The `PoolSpec` that `pool set` sends: only the options given are set.
pub fn pool_spec(args: &PoolSetArgs) -> Result<pb::PoolSpec, CtlError> {
    Ok(pb::PoolSpec {
        name: args.name.clone(),
        max_concurrent: args.max_concurrent,
        parent: args.parent.clone(),
        max_queue_depth: args.max_queue_depth,
        on_overflow: args.on_overflow.map(|o| o.as_str().to_owned()),
        cooldown: wire_opt(args.cooldown)?,
        default_ttl: wire_opt(args.default_ttl)?,
        max_ttl: wire_opt(args.max_ttl)?,
        max_wait: wire_opt(args.max_wait)?,
        default_retry_after: wire_opt(args.default_retry_after)?,
        adaptive: args.adaptive,
        headroom_recovery: wire_opt(args.headroom_recovery)?,
        max_agent_retry_after: wire_opt(args.max_agent_retry_after)?,
        requests_per_minute: args.requests_per_minute,
        input_tokens_per_minute: args.input_tokens_per_minute,
        output_tokens_per_minute: args.output_tokens_per_minute,
        budget_shadow: args.budget_shadow,
        failure_hold: wire_opt(args.failure_hold)?,
        cancel_cooldown: wire_opt(args.cancel_cooldown)?,
        phantom_hold: wire_opt(args.phantom_hold)?,
        breaker_enabled: args.breaker,
        ..Default::default()
    })
}

/// `slotctl pool set`: Admin.UpsertPool.
///
/// # Cancel safety
/// Dropping the future may or may not have applied the change.
pub async fn pool_set(conn: &Conn, args: &PoolSetArgs, output: Output) -> Result<(), CtlError> {
    let spec = pool_spec(args)?;
    let resp = conn
        .call(|_, mut a| {
            let r = pb::UpsertPoolRequest { pool: Some(spec.clone()) };
            async move { a.upsert_pool(r).await }
        })
        .await?
        .0;
    let resp = resp.into_inner();
    let verb = if resp.created { "created" } else { "updated" };
    match (output, resp.pool) {
        (Output::Json, p) => {
            let p = p.unwrap_or_default();
            println!(
                "{}",
                json!({
                    "created": resp.created,
                    "name": if p.name.is_empty() { &args.name } else { &p.name },
                    "limit": p.limit,
                    "effective_limit": p.effective_limit,
                    "in_flight": p.in_flight,
                    "queued": p.queued,
                })
            );
        }
        (Output::Table, Some(p)) => {
            println!("{verb} pool {}: in_flight/eff/limit {}, {} queued", p.name, usage(&p), p.queued)
        }
        (Output::Table, None) => println!("{verb} pool {}", args.name),
    }
    Ok(())
}

/// `slotctl pool rm`: Admin.DeletePool.
///
/// # Cancel safety
/// Dropping the future may or may not have removed the pool.
pub async fn pool_rm(conn: &Conn, name: &str) -> Result<(), CtlError> {
    let resp = conn
        .call(|_, mut a| {
            let r = pb::DeletePoolRequest { name: name.to_owned() };
            async move { a.delete_pool(r).await }
        })
        .await?
        .0;
    let r = resp.into_inner();
    println!(
        "removed pool {name} ({} waiters rejected, {} leases expired)",
        r.rejected_waiters, r.expired_leases
    );
    Ok(())
}

/// `slotctl pause`: Admin.PausePool.
///
/// # Cancel safety
/// Dropping the future may or may not have paused the pool.
pub async fn pause(conn: &Conn, pool: &str, duration: Duration, reason: &str) -> Result<(), CtlError> {
    if duration.is_zero() {
        return Err(CtlError::with_code("--for must be longer than 0s", tonic::Code::InvalidArgument));
    }
    let req = pb::PausePoolRequest {
        pool: pool.to_owned(),
        duration: Some(wire(duration)?),
        reason: reason.to_owned(),
    };
    let resp = conn
        .call(|_, mut a| {
            let r = req.clone();
            async move { a.pause_pool(r).await }
        })
        .await?
        .0
        .into_inner();
    match remaining(resp.paused_until.as_ref(), SystemTime::now()) {
        Some(left) => println!("paused {pool} for {}", fmt_duration(left)),
        None => println!("paused {pool}"),
    }
    Ok(())
}

/// `slotctl resume`: Admin.ResumePool.
///
/// # Cancel safety
/// Dropping the future may or may not have resumed the pool.
pub async fn resume(conn: &Conn, pool: &str) -> Result<(), CtlError> {
    let req = pb::ResumePoolRequest { pool: pool.to_owned() };
    let resp = conn
        .call(|_, mut a| {
            let r = req.clone();
            async move { a.resume_pool(r).await }
        })
        .await?
        .0
        .into_inner();
    if resp.was_paused {
        println!("resumed {pool}");
    } else {
        println!("{pool} was not paused");
    }
    Ok(())
}

/// `slotctl breaker`: Admin.ForceBreaker.
///
/// # Cancel safety
/// Dropping the future may or may not have forced the breaker.
pub async fn breaker(conn: &Conn, pool: &str, to: BreakerTo, reason: &str) -> Result<(), CtlError> {
    let to = match to {
        BreakerTo::Open => pb::BreakerForce::Open,
        BreakerTo::Close => pb::BreakerForce::Closed,
    };
    let req = pb::BreakerForceRequest { pool: pool.to_owned(), to: to as i32, reason: reason.to_owned() };
    let resp = conn
        .call(|_, mut a| {
            let r = req.clone();
            async move { a.force_breaker(r).await }
        })
        .await?
        .0
        .into_inner();
    let state = resp.status.map(|s| s.state()).unwrap_or_default();
    match state {
        pb::BreakerState::Open => println!("breaker of {pool} forced open"),
        _ => println!("breaker of {pool} closed"),
    }
    Ok(())
}

/// The length of a full lease id (hex digits).
pub const LEASE_ID_LEN: usize = 32;

/// The one lease whose id starts with `prefix` (as `slotctl status` shows them).
async fn expand_lease_id(conn: &Conn, prefix: &str) -> Result<String, CtlError> {
    if prefix.is_empty() {
        return Err(CtlError::with_code("empty lease id", tonic::Code::InvalidArgument));
    }
    let status = conn.status(None).await?;
    let mut matches = status.leases.into_iter().filter(|l| l.lease_id.starts_with(prefix));
    match (matches.next(), matches.next()) {
        (Some(l), None) => Ok(l.lease_id),
        (None, _) => {
            Err(CtlError::with_code(format!("no lease id starts with {prefix}"), tonic::Code::NotFound))
        }
        (Some(_), Some(_)) => Err(CtlError::with_code(
            format!("more than one lease id starts with {prefix}; give more digits"),
            tonic::Code::InvalidArgument,
        )),
    }
}

/// `slotctl revoke`: Admin.RevokeLease. A prefix of an id (8 digits, as in `slotctl status`) is
/// expanded through Status when it matches exactly one lease.
///
/// # Cancel safety
/// Dropping the future may or may not have revoked the lease.
pub async fn revoke(conn: &Conn, lease_id: &str) -> Result<(), CtlError> {
    let full;
    let lease_id = if lease_id.len() < LEASE_ID_LEN {
        full = expand_lease_id(conn, lease_id).await?;
        full.as_str()
    } else {
        lease_id
    };
    let req = pb::RevokeLeaseRequest { lease_id: lease_id.to_owned() };
    let resp = conn
        .call(|_, mut a| {
            let r = req.clone();
            async move { a.revoke_lease(r).await }
        })
        .await?
        .0
        .into_inner();
    let holder = if resp.holder.is_empty() { "-" } else { &resp.holder };
    println!("revoked lease {lease_id} (pool {}, holder {holder})", resp.pool);
    Ok(())
}

/// `slotctl drain`: Admin.Drain, printing each progress message. Returns the exit code: 0 once no
/// lease is held, 1 if the stream ended first (the timeout passed).
///
/// # Cancel safety
/// Dropping the future stops reporting; the daemon keeps draining (granting stays stopped until
/// Undrain).
pub async fn drain(conn: &Conn, timeout: Option<Duration>, output: Output) -> Result<i32, CtlError> {
    let req = pb::DrainRequest { timeout: wire_opt(timeout)? };
    let mut stream = conn
        .call(|_, mut a| {
            let r = req;
            async move { a.drain(r).await }
        })
        .await?
        .0
        .into_inner();
    let mut last = None;
    loop {
        let p = match stream.message().await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(s) => {
                let mut e = CtlError::from(s);
                e.message.push_str("; granting stays stopped until `slotctl undrain`");
                return Err(e);
            }
        };
        match output {
            Output::Json => println!(
                "{}",
                json!({"leases_remaining": p.leases_remaining, "queued": p.queued, "done": p.done})
            ),
            Output::Table if p.done => {
                println!(
                    "drained: no lease is held ({} queued); granting stays stopped until `slotctl undrain`",
                    p.queued
                )
            }
            Output::Table => {
                println!("draining: {} leases remaining, {} queued", p.leases_remaining, p.queued)
            }
        }
        if p.done {
            return Ok(0);
        }
        last = Some(p);
    }
    let left = last.map_or_else(|| "some".to_owned(), |p| p.leases_remaining.to_string());
    eprintln!(
        "slotctl: drain stopped reporting with {left} leases still held (granting stays stopped until \
         `slotctl undrain`)"
    );
    Ok(1)
}

/// `slotctl undrain`: Admin.Undrain.
///
/// # Cancel safety
/// Dropping the future may or may not have resumed granting.
pub async fn undrain(conn: &Conn) -> Result<(), CtlError> {
    conn.call(|_, mut a| {
        let r = pb::UndrainRequest {};
        async move { a.undrain(r).await }
    })
    .await?;
    println!("granting again");
    Ok(())
}
