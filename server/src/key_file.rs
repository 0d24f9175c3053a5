//! The key file of resume credentials: 32 random bytes, mode 0600, created atomically on first start.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use crate::scheduler::LeaseKey;

/// A key file that could not be read, created, or trusted.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or creating it (or the state directory) failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// It exists but must not be used as it is.
    #[error("key file {path}: {why}")]
    Refused {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        why: String,
    },
}

/// Reads the key at `path`, creating it (and its directory, mode 0700) on first start.
///
/// Refuses a file that is not a regular file, is not 32 bytes long, is readable or writable by group or
/// others, or belongs to another user: anyone who can read the key can resume any lease.
pub fn load_or_create(path: &Path) -> Result<LeaseKey, KeyFileError> {
    let io = |what| move |source| KeyFileError::Io { path: path.to_owned(), what, source };
    match std::fs::symlink_metadata(path) {
        Ok(_) => return read(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot inspect it")(e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    create_dir(dir).map_err(io("cannot create its directory"))?;
    let mut bytes = [0u8; LeaseKey::LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| {
        KeyFileError::Refused { path: path.to_owned(), why: "the OS random generator failed".into() }
    })?;
    // Written in full under a temporary name (created 0600) and then linked into place, so a crash
    // never leaves a short key, and two daemons starting at once agree on one key.
    let mut tmp =
        tempfile::Builder::new().prefix(".lease.key.").tempfile_in(dir).map_err(io("cannot create it"))?;
    tmp.write_all(&bytes).map_err(io("cannot write it"))?;
    tmp.as_file().sync_all().map_err(io("cannot write it"))?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            tracing::info!(path = %path.display(), "created the key of resume credentials");
            Ok(LeaseKey::from_bytes(&bytes))
        }
        // Another process created it first: use that one.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(io("cannot create it")(e.error)),
    }
}

fn read(path: &Path) -> Result<LeaseKey, KeyFileError> {
    let refused = |why: String| KeyFileError::Refused { path: path.to_owned(), why };
    let meta = std::fs::symlink_metadata(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        what: "cannot inspect it",
        source,
    })?;
    if !meta.is_file() {
        return Err(refused("not a regular file (a symbolic link or a directory?)".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(refused(format!(
                "mode {mode:04o} lets group or others access it; anyone who reads it can resume any lease: \
                 run `chmod 600` on it"
            )));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(refused(format!("owned by uid {}, not by this process (uid {me})", meta.uid())));
        }
    }
    if meta.len() != LeaseKey::LEN as u64 {
        return Err(refused(format!(
            "{} bytes long, want {}: restore it, or remove it to make a new key (which invalidates every \
             held lease's resume credential)",
            meta.len(),
            LeaseKey::LEN
        )));
    }
    let mut bytes = [0u8; LeaseKey::LEN];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| KeyFileError::Io { path: path.to_owned(), what: "cannot read it", source })?;
    Ok(LeaseKey::from_bytes(&bytes))
}

/// Creates the state directory (mode 0700) if it is missing.
pub fn ensure_state_dir(dir: &Path) -> Result<(), KeyFileError> {
    create_dir(dir).map_err(|source| KeyFileError::Io {
        path: dir.to_owned(),
        what: "cannot create the state directory",
        source,
    })
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{FencingToken, LeaseId, PoolId};

    fn cred(k: &LeaseKey) -> String {
        k.credential(LeaseId(1), FencingToken(1), &PoolId::new("p"), "h").expose().to_owned()
    }

    #[test]
    fn the_key_is_created_once_with_mode_0600_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("lease.key");
        let first = load_or_create(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(
                std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        let again = load_or_create(&path).unwrap();
        assert_eq!(cred(&first), cred(&again));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_short_or_exposed_key_file_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.key");
        std::fs::write(&path, b"short").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = load_or_create(&path).unwrap_err().to_string();
            assert!(err.contains("5 bytes long, want 32"), "{err}");
            std::fs::write(&path, [0u8; 32]).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let err = load_or_create(&path).unwrap_err().to_string();
            assert!(err.contains("mode 0640") && err.contains("chmod 600"), "{err}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(load_or_create(&path).is_ok());
        }
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
