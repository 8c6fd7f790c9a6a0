"""Property-based fuzzing of the control server (hypothesis) over a real Unix socket.

The server serves ixyd's methods with their real parameter schemas (IXYD_METHODS) and
handlers that record each call and answer with its parameters, as ixyd's do (capture's
result carries its duration, set_forward's its settings). Hypothesis writes request lines:
requests built from the schemas with values at and beyond their edges (1e999, integers
of thousands of digits, lone surrogates, wrong types, missing and unknown parameters),
batches up to past the limit, odd ids, byte order marks, and raw bytes. What must hold
for every line:

- every line the server sends is JSON without NaN or Infinity;
- a handler that ran for a request with an id is answered (the 1e999 id used to apply
  set_forward and leave the client without an answer);
- no handler sees a non-finite number;
- nothing fails inside (no -32603), and no message names Python's internals;
- the connection, or the server, goes on serving.

CI runs IXYD_FUZZ_EXAMPLES (default 2,000) lines; benchmarks/fuzz_control.py runs
10,000 or more with the same strategies and checks and prints what it saw.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ixyd.control import IXYD_METHODS, ControlServer, ErrorCode, Param, Stream

EXAMPLES = int(os.environ.get("IXYD_FUZZ_EXAMPLES", "2000"))
# What a message must never show: Python's own words (tracebacks, reprs, the hints of
# json and int() that name Python's knobs and codecs)
INTERNALS = (
    "Traceback",
    "sys.",
    "set_int_max_str_digits",
    "Exceeds the limit",
    "utf-8-sig",
    "codec",
    "object at 0x",
    "<class",
    "Error(",
)
DOCUMENTED_CODES = {int(code) for code in ErrorCode}
SENTINEL = "fuzz_sentinel"  # a method of its own, not recorded; its id says which exchange


# ---------------------------------------------------------------------------- the server
class FuzzTarget:
    """A ControlServer in a fresh directory serving IXYD_METHODS with recording handlers;
    `exchange(line)` sends one line and returns what came back for it."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="ixyd-fuzz-")
        self.calls: list[tuple[str, dict]] = []
        self.server = ControlServer(os.path.join(self.directory, "fuzz.sock"))
        for name, spec in IXYD_METHODS.items():
            self.server.register(
                name,
                self._handler(name, spec.streaming),
                params_schema=spec.params,
                mutating=spec.mutating,
                streaming=spec.streaming,
            )
        self.server.register("fuzz_sentinel", lambda: "ok", params_schema={}, mutating=False)
        self.server.serve()
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.sentinels = 0

    def _handler(self, name: str, streaming: bool):
        def handle(**params):
            self.calls.append((name, params))
            result = {"call": len(self.calls) - 1, "method": name, **params}
            if not streaming:
                return result
            stream = Stream(result, on_close=lambda: None)
            stream.end("capture.end", {"frames": 0, "dropped": 0, "reason": "count"})
            return stream

        return handle

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.server.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(30)
            self.sock.connect(self.server.path)
            self.buffer = b""
        return self.sock

    def exchange(self, line: bytes) -> tuple[list[bytes], bool]:
        """Send `line` and a sentinel call; (the lines that came before the
        sentinel's answer, whether the connection is still open). A closed connection is
        replaced by a new one for the next exchange, which must be served."""
        sock = self._connect()
        self.sentinels += 1
        sentinel = f'{{"jsonrpc":"2.0","id":"{SENTINEL}-{self.sentinels}","method":"{SENTINEL}"}}\n'
        try:
            sock.sendall(line + sentinel.encode())
            if len(line) > self.server.max_line:  # refused and closed: say we are done, or
                sock.shutdown(socket.SHUT_WR)  # it waits a second for the rest of the line
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed while we sent: read what it said
        lines = []
        while True:
            while b"\n" not in self.buffer:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    self.sock.close()
                    self.sock = None
                    return lines + ([self.buffer] if self.buffer else []), False
                self.buffer += chunk
            reply, _, self.buffer = self.buffer.partition(b"\n")
            if f'"id":"{SENTINEL}-{self.sentinels}"'.encode() in reply:
                return lines, True
            lines.append(reply)


# ---------------------------------------------------------------------------- the inputs
@dataclass(frozen=True)
class Raw:
    """JSON text written as it is: numbers json.dumps cannot write (1e999 is inf on
    the way in; an integer of 5,000 digits is over Python's int-to-str limit)."""

    text: str


def to_json(value) -> str:
    """JSON text of a generated value (Raw as it is, ±inf as ±1e999); no raw newline."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, float) and math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    return False


# over Python's default int-to-str limit of 4,300 digits, and well under
huge_integers = st.sampled_from([4_301, 5_000, 300]).map(lambda n: Raw("9" * n))
overflowing = st.sampled_from([Raw("1e999"), Raw("-1e999"), Raw("1E400"), float("inf")])
integers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, -1, 59, 60, 1514, 1515, 2**63, 2**64]),
)
floats = st.floats(allow_nan=False)  # NaN is not JSON; inf is written as 1e999
texts = st.one_of(st.text(max_size=20), st.sampled_from(["", "demo.0", "\ud800", "x" * 300]))
scalars = st.one_of(st.none(), st.booleans(), integers, floats, texts, texts, overflowing)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def value_for(spec: Param):
    """Values for one parameter: mostly of its type, at and past its bounds and choices,
    sometimes overflowing or anything at all."""
    if spec.type is int:
        typed = integers
    elif spec.type is float:
        typed = st.one_of(floats, integers)
    elif spec.type is str:
        typed = texts if spec.choices is None else st.sampled_from(spec.choices) | texts
    elif spec.type is bool:
        typed = st.booleans()
    else:
        typed = json_values
    bounds = [b for b in (spec.minimum, spec.maximum) if b is not None]
    edges = st.sampled_from([b + d for b in bounds for d in (-1, 0, 1)]) if bounds else typed
    return st.one_of(typed, typed, typed, edges, overflowing, json_values)


@st.composite
def params_for(draw, method: str):
    """Named parameters of `method` from its schema, with some left out, some unknown
    ones added; sometimes not an object at all."""
    spec = IXYD_METHODS.get(method)
    if spec is None or draw(st.integers(0, 9)) == 0:
        return draw(
            st.one_of(st.dictionaries(st.text(max_size=6), json_values, max_size=3), json_values)
        )
    params = {}
    for name, param in spec.params.items():
        if (param.required and draw(st.integers(0, 9)) > 0) or draw(st.booleans()):
            params[name] = draw(value_for(param))
    if draw(st.integers(0, 9)) == 0:
        params[draw(st.text(max_size=6))] = draw(json_values)
    return params


ids = st.one_of(
    st.integers(),
    st.integers(),
    texts,
    st.none(),
    st.sampled_from([float("inf"), float("-inf"), Raw("1e999"), 1.5, -0.0, True]),
    huge_integers,  # a parse error for the whole line: in ids only, not to drown the rest
    json_values,
)
known_methods = st.sampled_from(sorted(IXYD_METHODS))
methods = st.one_of(
    known_methods, known_methods, known_methods, st.sampled_from(["nope", "rpc.x", ""]), texts
)


@st.composite
def requests(draw):
    method = draw(methods)
    request = {
        "jsonrpc": draw(st.sampled_from(["2.0"] * 9 + ["1.0"])),
        "method": method if draw(st.integers(0, 19)) else draw(json_values),
    }
    if draw(st.integers(0, 4)):
        request["params"] = draw(params_for(method))
    if draw(st.integers(0, 5)):  # else a notification
        request["id"] = draw(ids)
    return request


def as_line(value) -> bytes:
    return to_json(value).encode("utf-8", "surrogatepass") + b"\n"


lines = st.one_of(
    requests().map(as_line),
    requests().map(as_line),
    requests().map(as_line),
    requests().map(as_line),
    st.lists(requests(), min_size=0, max_size=40).map(as_line),
    json_values.map(as_line),
    requests().map(lambda r: b"\xef\xbb\xbf" + as_line(r)),  # a byte order mark
    requests().map(lambda r: as_line(r)[: -len(b"}\n")] + b"\n"),  # cut short
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ") + b"\n"),
)


# ---------------------------------------------------------------------------- the checks
def _reject_constant(name):
    raise ValueError(f"the server sent {name}")


def check_line(target: FuzzTarget, line: bytes, seen: Counter) -> None:
    """Send `line`; assert the properties in the module's docstring; count the answers by
    code in `seen`."""
    first_call = len(target.calls)
    got, still_open = target.exchange(line)
    replies = []
    for reply_line in got:
        reply = json.loads(reply_line, parse_constant=_reject_constant)
        replies.extend(reply if isinstance(reply, list) else [reply])
    answered = set()
    for reply in replies:
        assert isinstance(reply, dict) and reply.get("jsonrpc") == "2.0", reply
        if "error" in reply:
            error = reply["error"]
            seen[error["code"]] += 1
            assert error["code"] in DOCUMENTED_CODES, reply
            assert error["code"] != ErrorCode.INTERNAL_ERROR, reply
            for word in INTERNALS:
                assert word not in error["message"], reply
        elif "result" in reply:
            seen["result"] += 1
            if isinstance(reply["result"], dict) and "call" in reply["result"]:
                answered.add(reply["result"]["call"])
        else:
            assert reply.get("method", "").startswith("capture."), reply  # a stream's
    try:
        sent = json.loads(line.decode("utf-8", "surrogatepass"))
    except ValueError:
        sent = None
    sent_requests = sent if isinstance(sent, list) else [sent]
    notified = {
        r.get("method")
        for r in sent_requests
        if isinstance(r, dict) and "id" not in r and isinstance(r.get("method"), str)
    }
    for number, (method, params) in enumerate(target.calls[first_call:], first_call):
        assert not has_non_finite(params), (method, params)
        assert number in answered or method in notified, (
            f"'{method}' ran (call {number}) and was never answered: {line[:300]!r}"
        )
    if not still_open:  # after a capture or an oversized line; the server must go on
        assert target.exchange(b"")[1], "the server stopped serving"


@pytest.fixture(scope="module")
def target():
    fuzz_target = FuzzTarget()
    yield fuzz_target
    fuzz_target.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(line=lines)
def test_any_line_is_answered_safely_and_the_server_goes_on(target, line):
    check_line(target, line, Counter())
