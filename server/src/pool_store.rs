//! The one place a pool change is applied and persisted: Admin's upsert and delete, and a
//! configuration reload (SIGHUP) all go through [`PoolStore`].
//!
//! With a state file, each change runs under the file's lock, and the pool set the driver reports
//! after applying it is written back, so writes land in the order the changes were applied and the
//! running pools and the file agree (see `state`).

use std::{future::Future, sync::Arc};

use crate::{
    driver::{DriverHandle, PoolUpserted, Pools},
    scheduler::{Error, PoolDeleted, PoolId, PoolPatch},
    state::{self, StateError, StateFile},
};

/// Why a pool change failed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The driver refused it; nothing changed.
    #[error("{0}")]
    Refused(#[from] Error),
    /// It was applied, but the state file could not be read or written.
    #[error("{0}")]
    State(#[from] StateError),
    /// It was applied, but could not be written to etcd under this leader's epoch (high
    /// availability: it may have been deposed).
    #[error("{0}")]
    Durable(String),
    /// The task applying it failed.
    #[error("pool change task failed: {0}")]
    Task(String),
}

/// Applies pool changes through the driver and persists them to the state file, if any.
#[derive(Clone, Debug)]
pub struct PoolStore {
    driver: DriverHandle,
    state: Option<Arc<StateFile>>,
    /// With high availability: the leader's durable state in etcd.
    durable: Option<crate::ha::Durable>,
}

impl PoolStore {
    /// A store that applies changes through `driver` and persists them to `state` (when set).
    pub fn new(driver: DriverHandle, state: Option<Arc<StateFile>>) -> Self {
        Self { driver, state, durable: None }
    }

    /// Also writes every Admin change's pool set to etcd, under the leader's epoch.
    pub fn with_durable(mut self, durable: Option<crate::ha::Durable>) -> Self {
        self.durable = durable;
        self
    }

    /// Creates a pool or changes some of its settings; a new pool may not take the count above
    /// `max_pools`.
    ///
    /// # Cancel safety
    /// Not cancel safe in effect: the change runs in a task of its own, so once started it is applied
    /// and persisted even if the caller stops waiting.
    pub async fn upsert(
        &self,
        pool: PoolId,
        patch: PoolPatch,
        max_pools: usize,
    ) -> Result<PoolUpserted, ChangeError> {
        self.change(move |driver, _| async move {
            let up = driver.upsert_pool(pool, patch, max_pools).await?;
            let pools = up.pools.clone();
            Ok((up, Some(pools)))
        })
        .await
    }

    /// Removes a pool that has no children.
    ///
    /// # Cancel safety
    /// As for [`PoolStore::upsert`].
    pub async fn delete(&self, pool: PoolId) -> Result<PoolDeleted, ChangeError> {
        self.change(move |driver, _| async move {
            let (done, pools) = driver.delete_pool(pool).await?;
            Ok((done, Some(pools)))
        })
        .await
    }

    /// Applies a reloaded configuration's pools. With a state file that exists, they are merged
    /// *under* it (the state file wins per pool; pools only in the config are added) and the result
    /// is written back; without one, the config stays the seed until the first Admin change.
    ///
    /// # Cancel safety
    /// As for [`PoolStore::upsert`].
    pub async fn reload(&self, config_pools: Pools) -> Result<(), ChangeError> {
        self.change(move |driver, state| async move {
            let saved = match state.as_deref() {
                Some(sf) => state::load(sf.path())?,
                None => None,
            };
            let persist = saved.is_some();
            let mut merged = config_pools;
            merged.extend(saved.unwrap_or_default());
            let pools = driver.set_pools(merged).await?;
            Ok(((), persist.then_some(pools)))
        })
        .await
    }

    /// Runs `apply` under the state file's lock, then writes the pool set it returns (`None`: write
    /// nothing). It runs in its own task: once the driver has applied a change, the write must
    /// happen even if the caller goes away.
    async fn change<T, F, Fut>(&self, apply: F) -> Result<T, ChangeError>
    where
        T: Send + 'static,
        F: FnOnce(DriverHandle, Option<Arc<StateFile>>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(T, Option<Pools>), ChangeError>> + Send + 'static,
    {
        let (driver, state, durable) = (self.driver.clone(), self.state.clone(), self.durable.clone());
        let task = tokio::spawn(async move {
            let _guard = match &state {
                Some(s) => Some(s.lock().await),
                None => None,
            };
            let (out, pools) = apply(driver, state.clone()).await?;
            if let (Some(d), Some(pools)) = (&durable, &pools) {
                d.save_pools(pools).await.map_err(ChangeError::Durable)?;
            }
            if let (Some(s), Some(pools)) = (&state, pools) {
                s.save(pools).await?;
            }
            Ok(out)
        });
        task.await.map_err(|e| ChangeError::Task(e.to_string()))?
    }
}
