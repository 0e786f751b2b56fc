//! The API's unix socket: mode 0660, group `berth` when that group exists, so root and the
//! group's members (a panel's agent) reach it and nobody else does. The socket is made under
//! a umask that leaves it no wider than that from the start.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use axum::Router;
use tokio::net::UnixListener;

/// The group whose members may use the socket.
pub const GROUP: &str = "berth";

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("create the API socket's directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API socket {} is served by another berthd", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is no socket: not replacing it", path.display())]
    NotSocket { path: PathBuf },
    #[error("{op} API socket {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Removes the socket file when berthd stops serving.
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `path` (a stale socket of a berthd that died is replaced; a live one is not).
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), SocketError> {
    let io = |op: &'static str| {
        let path = path.to_owned();
        move |source| SocketError::Io { op, path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(io("remove stale"))?;
        }
        Ok(_) => {
            return Err(SocketError::NotSocket {
                path: path.to_owned(),
            });
        }
        Err(_) => {}
    }
    // umask is per process: berthd binds before it starts any thread that creates files.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let std_listener = bound.map_err(io("bind"))?;
    let guard = SocketGuard(path.to_owned());
    if let Ok(Some(g)) = nix::unistd::Group::from_name(GROUP) {
        nix::unistd::chown(path, None, Some(g.gid))
            .map_err(|e| io("chown")(std::io::Error::from(e)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io("chmod"))?;
    std_listener
        .set_nonblocking(true)
        .map_err(io("configure"))?;
    let l = UnixListener::from_std(std_listener).map_err(io("register"))?;
    Ok((l, guard))
}

/// Serves `app` on `listener` until berthd stops.
pub async fn serve(listener: UnixListener, app: Router) {
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "API socket: serving ended");
    }
}
