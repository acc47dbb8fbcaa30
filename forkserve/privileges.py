"""Running as root: refuse unless told, or drop to --user/--group once the sockets are bound."""

from __future__ import annotations

import grp
import os
import pwd
import stat

from forkserve import logs
from forkserve.errors import ConfigError
from forkserve.settings import DEFAULT_APP
from forkserve.sockets import Listener


def check_root(user: str | None, allow_root: bool, app: str) -> None:
    """Refuse to serve an app as root without --user (or --allow-root). The built-in demo
    app is forkserve's own static page, so trying forkserve out works anywhere."""
    if os.geteuid() == 0 and user is None and not allow_root and app != DEFAULT_APP:
        raise ConfigError("refusing to run as root: add --user USER to switch to it once the "
                          "sockets are bound; in a container, set a non-root USER in the "
                          "image (or runAsUser in Kubernetes); or --allow-root if you mean it")


def resolve(user: str | None, group: str | None) -> tuple[int, int] | None:
    """(uid, gid) for --user/--group (the group defaults to the user's primary one)."""
    if user is None and group is None:
        return None
    try:
        entry = pwd.getpwuid(int(user)) if user and user.isdigit() else (
            pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid()))
    except KeyError:
        raise ConfigError(f"--user {user}: no such user") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"--group {group}: no such group") from None
    return entry.pw_uid, gid


def drop(ids: tuple[int, int], listeners: list[Listener]) -> None:
    """Hand unix sockets this process created, and the log files it opened that belong to
    it, to the user (so that USR1 can still reopen them), then become that user."""
    uid, gid = ids
    try:
        for listener in listeners:
            if listener.owns_path:
                os.chown(listener.address.path, uid, gid)
        for path in logs.log_files():
            info = os.stat(path)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                os.chown(path, uid, gid)
        if os.getgid() != gid or os.getuid() != uid:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
    except OSError as exc:
        raise ConfigError(f"cannot switch to uid {uid}, gid {gid}: {exc.strerror}") from None
