//! The state file: the pool set as changed through the Admin service, persisted so it survives a restart.
//!
//! Format: the `[pools.NAME]` tables of the config file and nothing else. Every write replaces the
//! whole file atomically (temp file in the same directory, fsync, rename, fsync of the directory), so
//! a crash leaves either the old set or the new one, never a torn file.
//!
//! Precedence: when the file exists at startup its pools replace the config file's (the config stays
//! the seed until the first Admin change). A SIGHUP reload merges the config file's pools *under* the
//! state file's (state wins per pool; pools only in the config are added) and writes the result, so the
//! running set and the file never disagree. A pool deleted through Admin that is still in the config
//! file therefore comes back on SIGHUP; remove it from the config file too.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, MutexGuard};

use crate::scheduler::{PoolConfig, PoolId, validate_tree};

/// Pools by name.
pub type Pools = BTreeMap<PoolId, PoolConfig>;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateToml {
    #[serde(default)]
    pools: Pools,
}

/// A state file that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The contents are not a valid pool set.
    #[error("state file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Reads the pool set from `path`; `Ok(None)` when the file does not exist.
pub fn load(path: &Path) -> Result<Option<Pools>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path: path.to_owned(), source }),
    };
    let invalid = |reason: String| StateError::Invalid { path: path.to_owned(), reason };
    let state: StateToml = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    validate_tree(&state.pools).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(state.pools))
}

/// Writes the pool set to `path` atomically (see the module docs).
pub fn write(path: &Path, pools: &Pools) -> Result<(), StateError> {
    let io = |source| StateError::Io { path: path.to_owned(), source };
    let body = toml::to_string_pretty(&StateToml { pools: pools.clone() })
        .map_err(|e| StateError::Invalid { path: path.to_owned(), reason: e.to_string() })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    // Same directory, so the rename cannot cross file systems. The temp file has a random name (two
    // daemons pointed at the same file, a mistake, never write through each other's) and is removed
    // if anything fails before the rename.
    let prefix = format!(".{name}.tmp.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    // Readable as far as the umask allows, as a plain `File::create` would be (tempfile's default
    // is owner-only).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir).map_err(io)?;
    tmp.write_all(
        b"# Written by slotd: pools as changed through slotd.v1.Admin. Edit only while slotd is stopped.\n",
    )
    .and_then(|()| tmp.write_all(body.as_bytes()))
    .and_then(|()| tmp.as_file().sync_all())
    .map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    // Make the rename itself durable. Directories cannot be opened for syncing everywhere, so a
    // failure here is not worth refusing a change that is already in place.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The state file shared by the Admin service and the reload task. Callers hold [`StateFile::lock`]
/// across "change the pools, then write them", so writes land in the order the changes were applied.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    lock: Mutex<()>,
}

impl StateFile {
    /// The state file at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path, lock: Mutex::new(()) }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serializes pool changes.
    ///
    /// # Cancel safety
    /// Cancel safe: cancelling loses your place in the queue for the lock.
    pub async fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Writes the pool set, off the async threads (it fsyncs).
    ///
    /// # Cancel safety
    /// Cancel safe in effect: the write runs to completion on a blocking thread even if this future
    /// is dropped, but then the caller no longer learns whether it succeeded.
    pub async fn save(&self, pools: Pools) -> Result<(), StateError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write(&path, &pools)).await.unwrap_or_else(|e| {
            Err(StateError::Invalid { path: self.path.clone(), reason: format!("writer task failed: {e}") })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        std::env::temp_dir().join(format!("slotd-state-{tag}-{}-{nanos}.toml", std::process::id()))
    }

    #[test]
    fn a_pool_set_round_trips_and_a_missing_file_is_none() {
        let path = temp_path("roundtrip");
        assert!(load(&path).unwrap().is_none());
        let mut pools = Pools::new();
        pools.insert(PoolId::new("g"), PoolConfig::with_limit(8));
        pools.insert(
            PoolId::new("a"),
            PoolConfig {
                parent: Some(PoolId::new("g")),
                cooldown: Duration::from_millis(250),
                max_wait: Some(Duration::from_secs(90)),
                ..PoolConfig::with_limit(3)
            },
        );
        write(&path, &pools).unwrap();
        assert_eq!(load(&path).unwrap(), Some(pools.clone()));
        // Rewriting replaces the whole set.
        pools.remove(&PoolId::new("a"));
        write(&path, &pools).unwrap();
        assert_eq!(load(&path).unwrap(), Some(pools));
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().filter_map(Result::ok).any(|e| {
            e.file_name().to_string_lossy().contains(".tmp.")
                && e.path().to_string_lossy().contains("roundtrip")
        });
        assert!(!leftovers, "no temp file is left behind");
        std::fs::remove_file(&path).unwrap();
    }

    /// A value that would overflow the clock (persisted by an older daemon, or written by hand) is
    /// refused at load, with the same bounds as the config file and Admin.
    #[test]
    fn a_state_file_with_a_duration_above_its_maximum_is_refused() {
        let path = temp_path("poisoned");
        for field in ["cooldown", "headroom_recovery"] {
            std::fs::write(
                &path,
                format!("[pools.a]\nmax_concurrent = 1\n{field} = \"9223372036854775807s\"\n"),
            )
            .unwrap();
            let err = load(&path).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("above the maximum"), "{err}");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn an_invalid_state_file_is_refused_with_its_path() {
        let path = temp_path("invalid");
        std::fs::write(&path, "[pools.a]\nmax_concurrent = 1\nparent = \"nope\"\n").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("does not exist") && err.contains("slotd-state-invalid"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
