"""The jailed child's filesystem: an empty, read-only tmpfs root plus chosen bind mounts."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from jail import linux
from jail.errors import JailError

# Where the new root's tmpfs is mounted before pivot_root (only inside the child's own
# mount namespace, so the host never sees it). The first one that is a real directory.
SCRATCH_MOUNT_POINTS = ("/tmp", "/mnt", "/var/tmp", "/run", "/dev")
ROOT_TMPFS_OPTIONS = "size=64k,nr_inodes=1024,mode=0755"


@dataclass(frozen=True)
class BindMount:
    source: str         # host path
    target: str         # absolute path inside the jail
    writable: bool = False


def plan_bind_mounts(specs: Iterable[tuple[str, str, bool] | BindMount]) -> list[BindMount]:
    """Check bind mount requests in the parent, and order them parents first."""
    binds: list[BindMount] = []
    for spec in specs:
        bind = spec if isinstance(spec, BindMount) else BindMount(*spec)
        target = os.path.normpath(bind.target)
        if not os.path.isabs(bind.target) or target == "/" or ".." in bind.target.split("/"):
            raise JailError(f"bind mount target {bind.target!r} must be an absolute path "
                            f"below / without '..'")
        if any(b.target == target for b in binds):
            raise JailError(f"two bind mounts on {target}")
        binds.append(BindMount(os.path.abspath(bind.source), target, bool(bind.writable)))
    return sorted(binds, key=lambda b: b.target.count("/"))


def open_sources(binds: Sequence[BindMount]) -> list[tuple[int, bool]]:
    """O_PATH fds of the bind sources, and whether each is a directory.

    Opened before anything else so that (1) they are resolved with the caller's
    credentials, before it becomes an unprivileged uid, and (2) the new root's tmpfs
    cannot hide them (e.g. sources under /tmp).
    """
    sources: list[tuple[int, bool]] = []
    try:
        for bind in binds:
            sources.append(_open_source(bind))
    except BaseException:
        for fd, _ in sources:
            os.close(fd)
        raise
    return sources


def enter_new_root(binds: Sequence[BindMount], sources: Sequence[tuple[int, bool]]) -> None:
    """Replace this mount namespace's root by a read-only tmpfs holding only `binds`.

    `sources` come from open_sources() and are closed here. Needs CAP_SYS_ADMIN over a
    mount namespace of our own. The old root is detached entirely, so nothing of the
    host stays reachable except through the bind mounts.
    """
    try:
        # Nothing we do may propagate back to the host's mount namespace.
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        _build_root(binds, sources)
    finally:
        for fd, _ in sources:
            os.close(fd)
    # pivot_root(".", ".") stacks the old root on top of the new one; unmounting "."
    # then detaches the old root (pivot_root(2), "NOTES").
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")
    linux.mount_setattr("/", linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID
                        | linux.MOUNT_ATTR_NODEV | linux.MOUNT_ATTR_NOEXEC, recursive=False)


def _open_source(bind: BindMount) -> tuple[int, bool]:
    try:
        fd = os.open(bind.source, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"{bind.source}: {e.strerror}") from None
    return fd, stat.S_ISDIR(os.fstat(fd).st_mode)


def _build_root(binds: Sequence[BindMount], sources: Sequence[tuple[int, bool]]) -> None:
    """Mount the new root's tmpfs, bind the sources into it, and chdir there."""
    scratch = next((p for p in SCRATCH_MOUNT_POINTS
                    if os.path.isdir(p) and not os.path.islink(p)), None)
    if scratch is None:
        raise OSError(errno.ENOENT, f"none of {', '.join(SCRATCH_MOUNT_POINTS)} is a "
                                    f"directory to build the new root on")
    linux.mount("jail", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                ROOT_TMPFS_OPTIONS)
    root_device = os.stat(scratch).st_dev
    for bind, (fd, is_directory) in zip(binds, sources):
        _bind(scratch, root_device, bind, fd, is_directory)
    os.chdir(scratch)


def _bind(root: str, root_device: int, bind: BindMount, fd: int, is_directory: bool) -> None:
    target = root + bind.target
    _make_mount_point(target, is_directory, root_device, bind)
    # The magic link leads to the opened source even where a mount now hides its path.
    # MS_REC: a user namespace may not split off a mount's locked sub-mounts.
    linux.mount(f"/proc/self/fd/{fd}", target, None, linux.MS_BIND | linux.MS_REC)
    attributes = linux.MOUNT_ATTR_NOSUID | (0 if bind.writable else linux.MOUNT_ATTR_RDONLY)
    linux.mount_setattr(target, attributes, recursive=True)


def _make_mount_point(target: str, is_directory: bool, root_device: int,
                      bind: BindMount) -> None:
    if os.path.lexists(target):
        if os.path.isdir(target) != is_directory:
            kind = "a directory" if is_directory else "a file"
            raise OSError(errno.EEXIST, f"bind mount {bind.source} is {kind} but "
                                        f"{bind.target} is not")
        return
    # Only ever create mount points on our own tmpfs, never inside an earlier bind
    # mount (that would create files on the host).
    ancestor = os.path.dirname(target)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if os.stat(ancestor).st_dev != root_device:
        raise OSError(errno.ENOENT, f"bind mount target {bind.target} does not exist inside "
                                    f"an earlier bind mount, and jail will not create it there")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if is_directory:
        os.mkdir(target)
    else:
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
