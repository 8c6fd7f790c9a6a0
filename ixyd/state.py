"""Runtime changes that survive a restart: `/var/lib/ixyd/<instance>.json`.

What `ixyd-ctl` changes (forwarding, promiscuous mode) is written here at once and laid
over the configuration at the next start. Writes are atomic: a temporary file in the
same directory, fsync, rename, fsync of the directory; a reader sees the old file or the
new one, never half of one. A file that cannot be read or makes no sense is logged, kept
aside as `<instance>.json.bad` for a human to look at, and ignored: a bad state file never
stops the daemon. So is a file with one setting the daemon cannot apply (a saved TAP the
sandbox does not allow, an interface name someone else took): the file as it was goes to
`.bad`, the file without that setting takes its place, and the port starts with what its
configuration says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_DIR_MODE = 0o755


class StateStore:
    """The state file of one instance: {"version": 1, "ports": {name: {"forward": {...},
    "promisc": bool}}}. Not thread-safe: the control thread is its only writer."""

    def __init__(self, state_dir: str, instance: str):
        self.path = os.path.join(state_dir, f"{instance}.json")
        self.ports: dict[str, dict[str, Any]] = {}

    def load(self) -> dict[str, dict[str, Any]]:
        """Read the file; return (and remember) its per-port settings, {} if there is none
        or it is corrupt (then it is moved to <path>.bad and a warning is logged)."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} ixyd state file")
            ports = data.get("ports")
            if not isinstance(ports, dict) or not all(isinstance(v, dict) for v in ports.values()):
                raise ValueError("'ports' is not an object of objects")
        except FileNotFoundError:
            self.ports = {}
            return {}
        # ValueError: json.JSONDecodeError and UnicodeError too; RecursionError: nesting
        # deeper than the interpreter's recursion limit, which json.loads does not catch
        except (OSError, ValueError, RecursionError) as exc:
            self._set_aside(exc)
            self.ports = {}
            return {}
        self.ports = ports
        return {name: dict(v) for name, v in ports.items()}

    def update(self, port: str, **settings: Any) -> None:
        """Record settings of one port (e.g. forward={...}, promisc=True) and write the file.
        Raises OSError if it cannot be written (the caller decides whether that matters)."""
        self.ports.setdefault(port, {}).update(settings)
        self.save()

    def save(self) -> None:
        """Write the whole state atomically (temp + fsync + rename + directory fsync)."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=STATE_DIR_MODE, exist_ok=True)
        text = json.dumps({"version": STATE_VERSION, "ports": self.ports}, indent=2, sort_keys=True)
        fd, temp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def set_aside_setting(self, port: str, key: str, problem: object) -> None:
        """Drop setting `key` of `port`, which could not be applied (`problem` says why):
        the file as it was is kept as <path>.bad, the file without the setting is written,
        so that the next start does not try it again. Never raises; logs what it did."""
        settings = self.ports.get(port, {})
        settings.pop(key, None)
        if not settings:
            self.ports.pop(port, None)
        kept = self._keep_as_bad()
        try:
            self.save()
        except OSError as exc:
            kept += f"; could not write the rest back: {exc}"
        log.warning(
            "state file %s: the saved %s of %s is unusable (%s); set aside (%s)",
            self.path,
            key,
            port,
            problem,
            kept,
        )

    def _keep_as_bad(self) -> str:
        """Move the file as it is to <path>.bad (replacing an older one); says what became
        of it, for the log. Never raises."""
        bad = self.path + ".bad"
        try:
            os.replace(self.path, bad)
            return f"the file as it was is kept as {bad}"
        except OSError as exc:
            return f"could not keep the file as it was: {exc}"

    def _set_aside(self, problem: Exception) -> None:
        kept = self._keep_as_bad()
        log.warning(
            "state file %s is unusable (%s); ignoring it, starting from the configuration (%s)",
            self.path,
            problem,
            kept,
        )
