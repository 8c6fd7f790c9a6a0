"""Slow HTTP clients against one TCP port (a slowloris), for the metrics exhaustion tests
(test_metrics.py on the host, tests/nspawn under systemd). Standard library only: it runs
as user nobody with the system's python3, from wherever the test copies it.

    python3 slow_clients.py PORT COUNT SECONDS

keeps COUNT connections to 127.0.0.1:PORT open for SECONDS: each sends a request header
one byte every DRIP seconds and never finishes it; a connection the server closes is
opened again. Prints one JSON line at the end: connections opened in all, closed by the
server, and the most that were open at once.
"""

from __future__ import annotations

import errno
import json
import resource
import selectors
import socket
import sys
import time

DRIP = 2.0  # seconds between two bytes of one connection: well inside any per-read timeout
HEADER = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10_000


def main(port: int, count: int, seconds: float) -> dict[str, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # COUNT may exceed 1024
    selector = selectors.DefaultSelector()
    position: dict[socket.socket, int] = {}  # bytes of HEADER each has sent
    opened = closed = most = 0

    def connect() -> None:
        nonlocal opened
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return
        opened += 1
        position[sock] = 0
        selector.register(sock, selectors.EVENT_READ)

    def drop(sock: socket.socket) -> None:
        nonlocal closed
        closed += 1
        selector.unregister(sock)
        del position[sock]
        sock.close()

    end = time.monotonic() + seconds
    next_drip = time.monotonic()
    while time.monotonic() < end:
        while len(position) < count:
            connect()
        most = max(most, len(position))
        for key, _ in selector.select(0.1):  # readable: the server answered or closed
            sock = key.fileobj
            try:
                if not sock.recv(65536):
                    drop(sock)
            except OSError:
                drop(sock)
        if time.monotonic() >= next_drip:
            next_drip += DRIP
            for sock in list(position):
                offset = position[sock] % len(HEADER)
                try:
                    sock.send(HEADER[offset : offset + 1])
                    position[sock] += 1
                except BlockingIOError:
                    pass  # still connecting (the server's backlog is full)
                except OSError:
                    drop(sock)
    return {"opened": opened, "closed_by_server": closed, "most_open": most}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))), flush=True)
