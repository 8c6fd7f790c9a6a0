"""Sockets handed over by systemd (socket activation, sd_listen_fds_with_names(3)).

ixyd's socket units name every socket they pass with FileDescriptorName=: `control` for
the JSON-RPC socket (control.py), `metrics` for the Prometheus endpoint (metrics.py).
Each face asks for its own name; neither consumes the environment, so both find theirs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from .errors import IxydError

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at fd 3


class ActivationError(IxydError):
    """systemd handed over sockets that ixyd cannot use as they are (names that do not
    match the fds, a socket of the wrong kind, one that is not listening)."""


def listen_fds_with_names() -> dict[int, str]:
    """The sockets systemd handed over, as {fd: name}; {} when not socket-activated.

    Uses systemd-python when installed, else reads LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES.
    The environment is left alone so that every face finds its socket;
    LISTEN_PID keeps child processes from taking them. Raises ActivationError if the
    names do not match the fds.
    """
    try:
        from systemd import daemon
    except ImportError:
        return _listen_fds_from_environment(os.environ, os.getpid())
    try:
        return daemon.listen_fds_with_names(unset_environment=False)
    except OSError as exc:
        raise ActivationError(
            f"systemd handed over sockets whose names cannot be read ({exc}; "
            f"LISTEN_FDNAMES={os.environ.get('LISTEN_FDNAMES')!r}): {_NAME_HINT}"
        ) from None


_NAME_HINT = (
    "set FileDescriptorName=control (or =metrics) in the socket unit; names may not contain ':'"
)


def _listen_fds_from_environment(environ: Mapping[str, str], pid: int) -> dict[int, str]:
    """sd_listen_fds_with_names(3) without libsystemd."""
    if environ.get("LISTEN_PID") != str(pid):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = environ["LISTEN_FDNAMES"].split(":") if environ.get("LISTEN_FDNAMES") else []
    if not names:
        names = ["unknown"] * count  # what sd_listen_fds_with_names reports
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDS={count} but LISTEN_FDNAMES has {len(names)} names "
            f"({environ['LISTEN_FDNAMES']!r}): {_NAME_HINT}"
        )
    fds = {}
    for i, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)  # sd_listen_fds sets FD_CLOEXEC too
        except OSError:
            raise ActivationError(f"LISTEN_FDS={count} but fd {fd} is not open") from None
        fds[fd] = name
    return fds


def activated_socket(
    name: str, families: tuple[socket.AddressFamily, ...], what: str, hint: str
) -> socket.socket | None:
    """The listening stream socket systemd handed over under `name`, or None.

    families: the address families the caller can serve; what: how to name such a socket
    in a message ("a Unix stream socket"); hint: what to put in the socket unit instead.
    Raises ActivationError if the fd is of another family or type, or not listening.
    """
    for fd, fd_name in listen_fds_with_names().items():
        if fd_name != name:
            continue
        sock = socket.socket(fileno=fd)
        if sock.family not in families or sock.type != socket.SOCK_STREAM:
            kind = f"{sock.family.name}/{sock.type.name}"
            sock.detach()
            raise ActivationError(
                f"the socket systemd handed over as '{name}' (fd {fd}) is {kind}, not {what}: "
                f"{hint}"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ActivationError(
                f"the socket systemd handed over as '{name}' (fd {fd}) is not listening: "
                "keep Accept=no in the socket unit"
            )
        return sock
    return None
