//! The state file: the pool set as changed through the Admin service, persisted so it survives a restart.
//!
//! Format: `version = 1`, then the `[pools.NAME]` tables of the config file and nothing else. The
//! version line makes the file self-describing: a file without it (empty, comments only, hand-made)
//! is refused at startup rather than served as "no pools". Every write replaces the whole file
//! atomically (temp file `.NAME.tmp.*` in the same directory, fsync, rename, fsync of the directory),
//! so a crash leaves either the old set or the new one, never a torn file; temp files a killed writer
//! left behind are removed at the next start ([`remove_stale_temp_files`]).
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

/// The `version` slotd writes and reads.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateToml {
    /// Always [`STATE_VERSION`] when slotd wrote the file; `None` when it did not.
    version: Option<u32>,
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
    match state.version {
        Some(STATE_VERSION) => {}
        None => {
            return Err(invalid(format!(
                "no `version = {STATE_VERSION}` line, so slotd did not write it (an empty or hand-made file \
                 would start the daemon with no pools); delete it to start from the config file's pools, \
                 or add `version = {STATE_VERSION}` if its pools are what you want served"
            )));
        }
        Some(v) => {
            return Err(invalid(format!(
                "version {v} is not supported (this slotd reads version {STATE_VERSION})"
            )));
        }
    }
    validate_tree(&state.pools).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(state.pools))
}

/// The pool set as slotd stores it (the state file's TOML, versioned), for a store other than a file
/// (etcd, with high availability).
pub fn encode(pools: &Pools) -> Result<String, String> {
    toml::to_string_pretty(&StateToml { version: Some(STATE_VERSION), pools: pools.clone() })
        .map_err(|e| e.to_string())
}

/// Reads what [`encode`] wrote; refuses another version and an invalid pool tree.
pub fn decode(text: &str) -> Result<Pools, String> {
    let state: StateToml = toml::from_str(text).map_err(|e| e.to_string())?;
    if state.version != Some(STATE_VERSION) {
        return Err(format!(
            "version {:?} is not supported (this slotd reads {STATE_VERSION})",
            state.version
        ));
    }
    validate_tree(&state.pools).map_err(|e| e.to_string())?;
    Ok(state.pools)
}

/// Writes the pool set to `path` atomically (see the module docs).
pub fn write(path: &Path, pools: &Pools) -> Result<(), StateError> {
    let io = |source| StateError::Io { path: path.to_owned(), source };
    let body = toml::to_string_pretty(&StateToml { version: Some(STATE_VERSION), pools: pools.clone() })
        .map_err(|e| StateError::Invalid { path: path.to_owned(), reason: e.to_string() })?;
    let dir = parent_dir(path);
    // Same directory, so the rename cannot cross file systems. The temp file has a random name (two
    // daemons pointed at the same file, a mistake, never write through each other's) and is removed
    // if anything fails before the rename.
    let prefix = temp_prefix(path);
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

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// How the names of `path`'s temp files begin: `.NAME.tmp.`.
fn temp_prefix(path: &Path) -> String {
    let name = path.file_name().map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    format!(".{name}.tmp.")
}

/// Removes the temp files of `path` that a writer killed mid-write (SIGKILL, power loss) left
/// behind; returns their names. Call it at startup, before anything writes: a temp file present
/// then belongs to no running write of this daemon.
pub fn remove_stale_temp_files(path: &Path) -> Vec<PathBuf> {
    let prefix = temp_prefix(path);
    let Ok(entries) = std::fs::read_dir(parent_dir(path)) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect()
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
                format!("version = 1\n[pools.a]\nmax_concurrent = 1\n{field} = \"9223372036854775807s\"\n"),
            )
            .unwrap();
            let err = load(&path).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("above the maximum"), "{err}");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_slotd_did_not_write_is_refused_not_served_as_no_pools() {
        let path = temp_path("unversioned");
        for text in ["", "# only a comment\n", "[pools.a]\nmax_concurrent = 1\n"] {
            std::fs::write(&path, text).unwrap();
            let err = load(&path).unwrap_err().to_string();
            assert!(
                err.contains("version = 1") && err.contains("slotd-state-unversioned"),
                "{text:?}: {err}"
            );
        }
        std::fs::write(&path, "version = 2\n").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("version 2 is not supported"));
        // What slotd writes for an empty set is still an empty set.
        write(&path, &Pools::new()).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("version = 1"));
        assert_eq!(load(&path).unwrap(), Some(Pools::new()));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn stale_temp_files_of_this_state_file_are_removed_and_nothing_else() {
        let path = temp_path("stale");
        let dir = path.parent().unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let stale = [dir.join(format!(".{name}.tmp.4242")), dir.join(format!(".{name}.tmp.Xy12ab"))];
        let other = dir.join(format!(".{name}.other"));
        for f in stale.iter().chain([&other]) {
            std::fs::write(f, "half a write").unwrap();
        }
        let mut removed = remove_stale_temp_files(&path);
        removed.sort();
        assert_eq!(removed, stale.to_vec());
        assert!(stale.iter().all(|f| !f.exists()) && other.exists());
        std::fs::remove_file(other).unwrap();
    }

    #[test]
    fn an_invalid_state_file_is_refused_with_its_path() {
        let path = temp_path("invalid");
        std::fs::write(&path, "version = 1\n[pools.a]\nmax_concurrent = 1\nparent = \"nope\"\n").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("does not exist") && err.contains("slotd-state-invalid"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
