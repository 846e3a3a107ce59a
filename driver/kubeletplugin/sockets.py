"""Where the plugin's two Unix sockets live, and their life cycle on disk.

The kubelet finds the plugin through ``<registry>/<driver>-reg.sock`` and then talks DRA over
``<plugins>/<driver>/dra.sock``. With a pod UID (rolling update) both names carry the UID so two
instances can overlap. A socket file left by an earlier run of *this* instance is replaced before
listening; on exit only the sockets this process created are removed, never another instance's
(the kubelet deregisters a plugin when its registration socket disappears).

Modes are set explicitly, never left to the umask: whoever can connect to the DRA socket can
prepare devices, so the plugin's own directory (which holds the DRA socket) is made 0700 before
the socket is bound - nobody else can reach the socket even in the moment between ``bind`` and
``chmod`` - and both sockets are then made 0600. The registration socket sits in the kubelet's
directory; before its ``chmod`` it offers only GetInfo, which names a socket others cannot reach.
(Changing the umask instead would change it for every thread of the process.)

This module does not start servers; it only names, prepares and removes socket files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from driver.errors import ConfigError

log = structlog.get_logger(__name__)

DIR_MODE = 0o700
SOCKET_MODE = 0o600
#: A Unix socket's path must fit sun_path: 108 bytes with the terminating NUL (unix(7)).
MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class SocketPaths:
    """The DRA service socket and the registration socket of one plugin instance."""

    dra: Path
    registration: Path

    @classmethod
    def for_driver(
        cls, registry_dir: Path, plugins_dir: Path, driver_name: str, pod_uid: str | None = None
    ) -> SocketPaths:
        """Socket paths as the Go helper names them (per-instance names when ``pod_uid`` is given)."""
        data_dir = plugins_dir / driver_name
        if pod_uid:
            paths = cls(data_dir / f"dra-{pod_uid}.sock", registry_dir / f"{driver_name}-{pod_uid}-reg.sock")
        else:
            paths = cls(data_dir / "dra.sock", registry_dir / f"{driver_name}-reg.sock")
        check_socket_path(paths.dra, plugins_dir, "--kubelet-plugins-directory-path")
        check_socket_path(paths.registration, registry_dir, "--kubelet-registrar-directory-path")
        return paths


def check_socket_path(path: Path, flag_dir: Path, flag: str) -> None:
    """Refuse a socket path longer than a Unix socket allows, naming the flag (``flag``, which set
    ``flag_dir``, the directory ``path`` lies under) and how long that directory may be.

    gRPC's own report of this is a bare "Failed to bind to address", which names no cause.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket path {path} is {size} bytes, Unix sockets allow at most {MAX_SOCKET_PATH}: "
            f"set {flag} to a directory at most {MAX_SOCKET_PATH - size + len(os.fsencode(flag_dir))} "
            "bytes long (the kubelet's root dir must match it)"
        )


def staging_path(path: Path) -> Path:
    """A hidden name beside ``path`` to bind under before renaming into place.

    The kubelet's plugin watcher skips dot files. The name is derived from ``path`` (so a start
    killed between bind and rename finds its leftover again) and is shorter than any socket name
    the plugin uses, so it never makes the path too long where the final name fits.
    """
    digest = hashlib.sha256(path.name.encode()).hexdigest()[:12]
    return path.with_name(f".{digest}.tmp")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and give it mode 0700 whatever the umask; return it."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    path.chmod(DIR_MODE)
    return path


def restrict_socket(path: Path) -> None:
    """Give a bound socket file mode 0600 (the umask at bind time is not trusted)."""
    path.chmod(SOCKET_MODE)


def prepare_socket_path(path: Path, *, own_dir: bool = False) -> None:
    """Create the parent directory and remove a stale socket at ``path`` so ``bind`` can succeed.

    ``own_dir``: the parent is the plugin's own directory, made 0700 (the registration socket's
    directory belongs to the kubelet and is left as it is).

    Raises:
        FileExistsError: ``path`` exists and is not a socket (never delete a file we do not own).
    """
    if own_dir:
        private_dir(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(
            f"{path} exists and is not a socket; remove it or choose another directory for the plugin"
        )
    path.unlink()
    log.info("removed stale socket", path=str(path))


@dataclass(slots=True)
class OwnedSocket:
    """A socket file this process bound; remembers its inode so removal never hits a successor's."""

    path: Path
    inode: int | None = None

    def mark_bound(self) -> None:
        """Record the inode of the socket file right after binding."""
        with contextlib.suppress(FileNotFoundError):
            self.inode = os.lstat(self.path).st_ino

    def remove(self) -> bool:
        """Remove the socket if it is still ours; return whether a file was removed."""
        try:
            current = os.lstat(self.path).st_ino
        except FileNotFoundError:
            return False
        if self.inode is not None and current != self.inode:
            log.warning("socket replaced by another process, leaving it", path=str(self.path))
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            return True
        return False
