"""The control server (ixyd.control) on real Unix sockets, with a small registry of test
methods: the protocol's error codes, batches and notifications, hostile and broken
clients, SO_PEERCRED authorization with clients forked as other users, socket activation
through an inherited fd, and what happens to socket files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from hosttools import NOBODY, Client, run_as, wait_until

from ixyd.activation import ActivationError, _listen_fds_from_environment
from ixyd.control import (
    LOG_BURST,
    ControlError,
    ControlServer,
    ErrorCode,
    Param,
    RpcError,
    socket_path,
)
from ixyd.errors import ConfigError, DeviceError

OPS_GID = 4242  # a group the socket belongs to; nobody is made a member where needed
OTHER_UID = 4243  # neither root, nor nobody, nor a member of anything
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switches uid: needs root")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def run_dir():
    """A short, world-searchable directory (AF_UNIX paths are limited to 107 bytes, and
    clients running as nobody must reach the socket)."""
    path = tempfile.mkdtemp(prefix="ixyd-ctl-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Calls:
    """What the test handlers were called with."""

    def __init__(self):
        self.log = []

    def record(self, name, **params):
        self.log.append((name, params))


def register_test_methods(server: ControlServer, calls: Calls) -> None:
    def echo(text, times=1):
        calls.record("echo", text=text, times=times)
        return {"text": text * times}

    def set_mode(mode):
        calls.record("set_mode", mode=mode)
        return {"mode": mode}

    def tick():
        calls.record("tick")

    def device_fails():
        raise DeviceError("0000:03:00.0 reads all-ones: the card is gone")

    def config_refused():
        raise ConfigError("CPU 99 is not available to ixyd (allowed: [0, 1])")

    def busy():
        raise RpcError(ErrorCode.BUSY, "a mode change on demo.0 is in progress")

    def port_stats(port):
        raise RpcError(ErrorCode.NOT_FOUND, f"no port '{port}' (ports: demo.0, demo.1)")

    def crash():
        raise RuntimeError("secret internal state 0xdeadbeef")

    def not_json():
        return {"when": object()}

    def slow(seconds):
        calls.record("slow", seconds=seconds)
        time.sleep(seconds)
        return seconds

    server.register(
        "echo",
        echo,
        params_schema={"text": Param(str), "times": Param(int, required=False, minimum=1)},
        mutating=False,
    )
    server.register(
        "set_mode",
        set_mode,
        params_schema={"mode": Param(str, choices=("drop", "reflect"))},
        mutating=True,
    )
    server.register("tick", tick, params_schema={}, mutating=False)
    server.register("device_fails", device_fails, params_schema={}, mutating=True)
    server.register("config_refused", config_refused, params_schema={}, mutating=True)
    server.register("busy", busy, params_schema={}, mutating=True)
    server.register("port_stats", port_stats, params_schema={"port": Param(str)}, mutating=False)
    server.register("crash", crash, params_schema={}, mutating=False)
    server.register("not_json", not_json, params_schema={}, mutating=False)
    server.register("slow", slow, params_schema={"seconds": Param(float)}, mutating=False)


@pytest.fixture
def calls():
    return Calls()


@pytest.fixture
def serve(run_dir, calls):
    """serve(**options) -> a running ControlServer with the test methods; closed after."""
    servers = []

    def start(name="test", **options):
        server = ControlServer(os.path.join(run_dir, f"{name}.sock"), **options)
        register_test_methods(server, calls)
        server.serve()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def error_of(reply):
    assert "error" in reply, reply
    return reply["error"]


# ---------------------------------------------------------------------------- the protocol
def test_call_returns_the_handlers_result_with_the_request_id(serve):
    client = Client(serve().path)
    reply = client.request(
        {"jsonrpc": "2.0", "id": "abc", "method": "echo", "params": {"text": "hi", "times": 2}}
    )
    assert reply == {"jsonrpc": "2.0", "id": "abc", "result": {"text": "hihi"}}


def test_malformed_json_is_a_parse_error_and_the_connection_stays_usable(serve):
    client = Client(serve().path)
    client.send(b'{"jsonrpc": "2.0", "method": \n')
    error = error_of(client.reply())
    assert error["code"] == ErrorCode.PARSE_ERROR == -32700
    assert "not valid JSON" in error["message"]
    assert client.call("echo", {"text": "still here"})["result"] == {"text": "still here"}


def test_non_utf8_input_is_a_parse_error(serve):
    client = Client(serve().path)
    client.send(b'{"jsonrpc": "2.0", "id": 1, "method": "echo\xff\xfe"}\n')
    reply = client.reply()
    assert reply["id"] is None
    assert error_of(reply)["code"] == ErrorCode.PARSE_ERROR
    assert "UTF-8" in error_of(reply)["message"]


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 20000 + b"]" * 20000 + b"\n",  # deeper than the decoder's recursion limit
        b'{"jsonrpc": "2.0", "id": 1, "method": "slow", "params": {"seconds": NaN}}\n',
        b"1" * 5000 + b"\n",  # beyond Python's integer-string limit
    ],
    ids=["nested-too-deeply", "nan", "huge-integer"],
)
def test_json_the_decoder_chokes_on_is_a_parse_error(serve, line):
    client = Client(serve().path)
    client.send(line)
    assert error_of(client.reply())["code"] == ErrorCode.PARSE_ERROR
    assert client.call("echo", {"text": "ok"})["result"] == {"text": "ok"}


def test_an_id_that_overflows_to_infinity_is_refused_before_the_method_runs(serve, calls):
    """1e999 is valid JSON but no number a reply can carry: the change must not happen
    unanswered (it used to: the reply failed to encode after the handler ran)."""
    client = Client(serve().path)
    for id_text in ("1e999", "-1e999"):
        client.send(
            b'{"jsonrpc": "2.0", "id": %s, "method": "set_mode", "params": {"mode": "drop"}}\n'
            % id_text.encode()
        )
        reply = client.reply()
        assert reply["id"] is None
        assert error_of(reply)["code"] == ErrorCode.INVALID_REQUEST
        assert "'id' must be a string, a finite number or null" in error_of(reply)["message"]
    client.send(
        b'[{"jsonrpc": "2.0", "id": 1e999, "method": "set_mode", "params": {"mode": "drop"}}]\n'
    )
    assert error_of(client.reply()[0])["code"] == ErrorCode.INVALID_REQUEST
    assert calls.log == []
    assert client.call("set_mode", {"mode": "drop"})["result"] == {"mode": "drop"}


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1E400"])
def test_a_parameter_that_overflows_to_infinity_is_invalid_params(serve, calls, number):
    client = Client(serve().path)
    client.send(
        b'{"jsonrpc": "2.0", "id": 7, "method": "slow", "params": {"seconds": %s}}\n'
        % number.encode()
    )
    reply = client.reply()
    assert reply["id"] == 7
    error = error_of(reply)
    assert error["code"] == ErrorCode.INVALID_PARAMS and error["data"] == {"param": "seconds"}
    assert "'seconds' must be a finite number, got a number beyond" in error["message"]
    assert calls.log == []


@pytest.mark.parametrize(
    "line, words",
    [
        (b'\xef\xbb\xbf{"jsonrpc": "2.0", "id": 1, "method": "tick"}\n', "byte order mark"),
        (b'{"jsonrpc": "2.0", "id": ' + b"9" * 5000 + b', "method": "tick"}\n', "digits"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tick"} x\n', "Extra data at character"),
    ],
    ids=["bom", "huge-integer", "extra-data"],
)
def test_parse_errors_speak_json_not_python(serve, line, words):
    client = Client(serve().path)
    client.send(line)
    error = error_of(client.reply())
    assert error["code"] == ErrorCode.PARSE_ERROR
    assert words in error["message"]
    for internal in ("utf-8-sig", "sys.", "set_int_max_str_digits", "Exceeds the limit"):
        assert internal not in error["message"]


def test_the_line_limit_counts_the_newline(serve):
    server = serve(max_line=4096)
    head = b'{"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"text": "'
    tail = b'"}}\n'
    exact = head + b"x" * (4096 - len(head) - len(tail)) + tail
    assert len(exact) == 4096
    client = Client(server.path)
    client.send(exact)
    assert "result" in client.reply()
    client.send(exact[:-4] + b'x"}}\n')  # 4097 bytes
    assert error_of(client.reply())["code"] == ErrorCode.REQUEST_TOO_LARGE
    assert client.closed_by_server()


@pytest.mark.parametrize(
    "request_, id_",
    [
        ("just a string", None),
        ({"id": 1, "method": "echo"}, 1),  # no "jsonrpc"
        ({"jsonrpc": "1.0", "id": 1, "method": "echo"}, 1),
        ({"jsonrpc": "2.0", "id": 2, "method": 7}, 2),
        ({"jsonrpc": "2.0", "id": 3, "method": "echo", "params": "hi"}, 3),
        ({"jsonrpc": "2.0", "id": True, "method": "echo"}, None),
        ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "echo"}, None),
        ({"jsonrpc": "2.0", "method": 7}, None),  # invalid even as a notification: answered
        ([], None),  # an empty batch
    ],
)
def test_invalid_requests_are_answered_invalid_request(serve, request_, id_):
    client = Client(serve().path)
    reply = client.request(request_)
    assert reply["id"] == id_
    assert error_of(reply)["code"] == ErrorCode.INVALID_REQUEST == -32600


def test_unknown_method_is_method_not_found_and_lists_the_methods(serve):
    reply = Client(serve().path).call("frobnicate")
    error = error_of(reply)
    assert error["code"] == ErrorCode.METHOD_NOT_FOUND == -32601
    assert "'frobnicate'" in error["message"] and "echo" in error["message"]


@pytest.mark.parametrize(
    "method, params, param, words",
    [
        ("echo", {"text": 5}, "text", "'text' must be a string, got 5"),
        ("echo", {}, "text", "missing parameter 'text'"),
        ("echo", {"text": "x", "tmes": 2}, "tmes", "unknown parameter 'tmes'"),
        ("echo", {"text": "x", "times": True}, "times", "must be an integer, got true"),
        ("echo", {"text": "x", "times": 2.0}, "times", "must be an integer, got 2.0"),
        ("echo", {"text": "x", "times": 0}, "times", "must be at least 1"),
        ("set_mode", {"mode": "bounce"}, "mode", 'one of "drop", "reflect", got "bounce"'),
        ("slow", {"seconds": "1"}, "seconds", "must be a number"),
    ],
)
def test_wrong_params_are_invalid_params_naming_the_parameter(serve, method, params, param, words):
    error = error_of(Client(serve().path).call(method, params))
    assert error["code"] == ErrorCode.INVALID_PARAMS == -32602
    assert f"'{method}'" in error["message"] and words in error["message"]
    assert error["data"] == {"param": param}


def test_positional_params_are_refused_but_an_empty_array_means_none(serve):
    client = Client(serve().path)
    error = error_of(client.call("echo", ["hi"]))
    assert error["code"] == ErrorCode.INVALID_PARAMS
    assert "named parameters" in error["message"]
    assert client.call("tick", [])["result"] is None


def test_params_are_checked_before_the_handler_runs(serve, calls):
    Client(serve().path).call("set_mode", {"mode": "bounce"})
    assert calls.log == []


@pytest.mark.parametrize(
    "method, code, words",
    [
        ("device_fails", ErrorCode.DEVICE_ERROR, "reads all-ones"),
        ("config_refused", ErrorCode.INVALID_PARAMS, "CPU 99 is not available"),
        ("busy", ErrorCode.BUSY, "in progress"),
    ],
)
def test_handler_errors_become_ixyd_error_codes(serve, method, code, words):
    error = error_of(Client(serve().path).call(method))
    assert error["code"] == code
    assert words in error["message"]


def test_unknown_port_is_not_found(serve):
    error = error_of(Client(serve().path).call("port_stats", {"port": "eth9"}))
    assert error["code"] == ErrorCode.NOT_FOUND == -32004
    assert "no port 'eth9'" in error["message"]


@pytest.mark.parametrize("method", ["crash", "not_json"])
def test_a_failing_handler_is_an_internal_error_logged_never_leaked(serve, caplog, method):
    client = Client(serve().path)
    with caplog.at_level(logging.ERROR, logger="ixyd.control"):
        reply = client.call(method)
    error = error_of(reply)
    assert error["code"] == ErrorCode.INTERNAL_ERROR == -32603
    assert "Traceback" not in json.dumps(reply) and "deadbeef" not in json.dumps(reply)
    assert "the ixyd log has the details" in error["message"]
    assert any(method in r.getMessage() for r in caplog.records)
    if method == "crash":
        assert any(r.exc_info and "deadbeef" in str(r.exc_info[1]) for r in caplog.records)
    assert client.call("echo", {"text": "alive"})["result"] == {"text": "alive"}


def test_batch_answers_each_request_in_order_and_skips_notifications(serve, calls):
    client = Client(serve().path)
    client.send(
        json.dumps(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"text": "a"}},
                {"jsonrpc": "2.0", "method": "tick"},  # a notification: run, not answered
                {"jsonrpc": "2.0", "id": 2, "method": "nope"},
                42,
                {"jsonrpc": "2.0", "id": 3, "method": "echo", "params": {"text": 3}},
            ]
        ).encode()
        + b"\n"
    )
    replies = client.reply()
    assert [r["id"] for r in replies] == [1, 2, None, 3]
    assert replies[0]["result"] == {"text": "a"}
    assert [r.get("error", {}).get("code") for r in replies[1:]] == [
        ErrorCode.METHOD_NOT_FOUND,
        ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_PARAMS,
    ]
    assert ("tick", {}) in calls.log


def test_notifications_run_and_are_never_answered_even_when_they_fail(serve, calls):
    client = Client(serve().path)
    notifications = [
        {"jsonrpc": "2.0", "method": "tick"},
        {"jsonrpc": "2.0", "method": "nope"},
        {"jsonrpc": "2.0", "method": "echo", "params": {"text": 1}},
        {"jsonrpc": "2.0", "method": "crash"},
    ]
    for notification in notifications:
        client.send(json.dumps(notification).encode() + b"\n")
    client.send(json.dumps(notifications).encode() + b"\n")  # a batch of notifications only
    reply = client.call("echo", {"text": "first answer"})  # the first line we get back
    assert reply["result"] == {"text": "first answer"}
    assert calls.log.count(("tick", {})) == 2


def test_blank_lines_are_ignored(serve):
    client = Client(serve().path)
    client.send(b"\n  \n")
    assert client.call("echo", {"text": "x"})["result"] == {"text": "x"}


def test_several_requests_in_one_write_get_answers_in_order(serve):
    client = Client(serve().path)
    client.send(
        b"".join(
            json.dumps(
                {"jsonrpc": "2.0", "id": i, "method": "echo", "params": {"text": str(i)}}
            ).encode()
            + b"\n"
            for i in range(50)
        )
    )
    assert [client.reply()["id"] for _ in range(50)] == list(range(50))


def test_last_request_without_newline_before_eof_is_answered(serve):
    client = Client(serve().path)
    client.send(b'{"jsonrpc": "2.0", "id": 9, "method": "echo", "params": {"text": "eof"}}')
    client.sock.shutdown(socket.SHUT_WR)
    assert client.reply()["result"] == {"text": "eof"}
    assert client.closed_by_server()


# ---------------------------------------------------------------------------- hostile clients
def test_a_line_over_the_limit_is_refused_then_closed_while_others_are_served(serve):
    server = serve(max_line=4096)
    bystander = Client(server.path)
    near_limit = {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"text": "x" * 3900}}
    assert bystander.request(near_limit)["result"] == {"text": "x" * 3900}

    flooder = Client(server.path)
    flooder.send(b'{"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"text": "')
    flooder.send(b"y" * 100_000 + b'"}}\n')
    error = error_of(flooder.reply())
    assert error["code"] == ErrorCode.REQUEST_TOO_LARGE == -32005
    assert "4096 bytes" in error["message"]
    assert flooder.closed_by_server()
    assert bystander.call("echo", {"text": "still served"})["result"] == {"text": "still served"}


def test_an_endless_line_without_newline_is_refused_then_closed(serve):
    server = serve(max_line=4096)
    flooder = Client(server.path)
    flooder.send(b"z" * 10_000)  # never a newline
    assert error_of(flooder.reply())["code"] == ErrorCode.REQUEST_TOO_LARGE
    assert flooder.closed_by_server()


def test_an_idle_client_is_closed_after_the_timeout_while_others_are_served(serve):
    server = serve(idle_timeout=0.3)
    idler = Client(server.path)
    started = time.monotonic()
    other = Client(server.path)
    assert other.call("echo", {"text": "x"})["result"] == {"text": "x"}
    assert idler.closed_by_server()
    assert 0.25 < time.monotonic() - started < 3.0


def test_a_client_trickling_a_line_is_closed_after_the_timeout(serve):
    server = serve(idle_timeout=0.4)
    trickler = Client(server.path)
    started = time.monotonic()
    for byte in b'{"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"text": "x"}}':
        try:
            trickler.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.05)
    assert trickler.closed_by_server()
    assert time.monotonic() - started < 2.0


def test_a_client_that_reads_no_replies_is_closed(serve):
    server = serve(idle_timeout=0.5)
    hog = Client(server.path)
    request = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"text": "x" * 1000, "times": 60}}
    ).encode()
    outcome = []

    def flood():  # ask again and again, read nothing
        try:
            for _ in range(2000):
                hog.send(request + b"\n")
        except OSError as exc:
            outcome.append(exc)

    flooder = threading.Thread(target=flood)
    flooder.start()
    flooder.join(10)
    assert not flooder.is_alive(), "the server kept a client that reads nothing"
    assert outcome and isinstance(outcome[0], BrokenPipeError | ConnectionResetError), outcome
    assert Client(server.path).call("echo", {"text": "x"})["result"] == {"text": "x"}


def test_clients_that_connect_and_vanish_do_not_disturb_the_server(serve, caplog):
    server = serve()
    with caplog.at_level(logging.WARNING, logger="ixyd.control"):
        for i in range(30):
            ghost = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ghost.connect(server.path)
            if i % 3 == 1:  # vanish mid-request
                ghost.sendall(b'{"jsonrpc": "2.0", "id": 1, "meth')
            elif i % 3 == 2:  # ask, then reset the connection before the answer
                ghost.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "slow", ')
                ghost.sendall(b'"params": {"seconds": 0.01}}\n')
                ghost.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ghost.close()
        survivor = Client(server.path)
        assert survivor.call("echo", {"text": "x"})["result"] == {"text": "x"}
        survivor.close()
        wait_until(lambda: server.client_count == 0, what="the ghosts' connections to end")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_clients_beyond_the_limit_are_refused_busy_and_the_rest_keep_working(serve):
    server = serve(max_clients=4, reserved_clients=1)
    holders = [Client(server.path) for _ in range(4)]
    for holder in holders:  # each has been accepted and counted
        assert holder.call("echo", {"text": "in"})["result"] == {"text": "in"}
    extra = Client(server.path)
    reply = extra.reply()
    assert error_of(reply)["code"] == ErrorCode.BUSY == -32003
    assert "too many clients" in error_of(reply)["message"]
    assert extra.closed_by_server()
    assert holders[0].call("echo", {"text": "still"})["result"] == {"text": "still"}
    holders.pop().close()
    wait_until(lambda: server.client_count == 3, what="a slot to free")
    assert Client(server.path).call("echo", {"text": "now"})["result"] == {"text": "now"}


def test_many_clients_at_once_are_all_served(serve):
    server = serve()
    failures = []

    def client_loop(n):
        try:
            client = Client(server.path)
            for i in range(20):
                reply = client.call("echo", {"text": f"{n}-{i}"})
                if reply.get("result") != {"text": f"{n}-{i}"}:
                    failures.append(reply)
            client.close()
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(48)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []


def test_a_slow_handler_delays_clients_but_loses_none(serve):
    server = serve()
    slow = Client(server.path)
    slow.send(b'{"jsonrpc": "2.0", "id": 1, "method": "slow", "params": {"seconds": 0.2}}\n')
    quick = Client(server.path)
    assert quick.call("echo", {"text": "after"})["result"] == {"text": "after"}
    assert slow.reply()["result"] == 0.2


# ---------------------------------------------------------------------------- authorization
def calls_from(path, *requests):
    """An action for run_as: make each (method, params) call, return the replies."""

    def action():
        client = Client(path)
        return [client.call(method, params) for method, params in requests]

    return action


READ_AND_CHANGE = (("echo", {"text": "r"}), ("set_mode", {"mode": "drop"}))


@needs_root
def test_an_unauthorized_peer_is_refused_a_change_but_a_group_member_may_read(serve, calls):
    server = serve(socket_mode=0o666, socket_group=OPS_GID)
    assert server.socket_gid == OPS_GID
    read, change = run_as(NOBODY, NOBODY, [OPS_GID], calls_from(server.path, *READ_AND_CHANGE))
    assert read["result"] == {"text": "r"}
    error = error_of(change)
    assert error["code"] == ErrorCode.UNAUTHORIZED == -32001
    assert "'set_mode' changes the daemon; only root and uid 0 (root)" in error["message"]
    assert "you are uid 65534" in error["message"]
    assert ("set_mode", {"mode": "drop"}) not in calls.log


@needs_root
def test_the_primary_group_counts_as_membership_for_reads(serve):
    server = serve(socket_mode=0o666, socket_group=OPS_GID)
    read, change = run_as(NOBODY, OPS_GID, [], calls_from(server.path, *READ_AND_CHANGE))
    assert read["result"] == {"text": "r"}
    assert error_of(change)["code"] == ErrorCode.UNAUTHORIZED


@needs_root
def test_a_peer_outside_the_sockets_group_may_not_even_read(serve):
    server = serve(socket_mode=0o666, socket_group=OPS_GID)
    read, change = run_as(NOBODY, NOBODY, [], calls_from(server.path, *READ_AND_CHANGE))
    error = error_of(read)
    assert error["code"] == ErrorCode.UNAUTHORIZED
    assert f"members of group gid {OPS_GID} (the control socket's group)" in error["message"]
    assert error_of(change)["code"] == ErrorCode.UNAUTHORIZED


@needs_root
def test_outsiders_learn_which_methods_exist_but_not_their_parameters(serve):
    server = serve(socket_mode=0o666, socket_group=OPS_GID)
    unknown, bad = run_as(
        NOBODY, NOBODY, [], calls_from(server.path, ("nope", None), ("set_mode", {"mode": 1}))
    )
    assert error_of(unknown)["code"] == ErrorCode.METHOD_NOT_FOUND
    assert error_of(bad)["code"] == ErrorCode.UNAUTHORIZED  # no schema hints for outsiders


@needs_root
def test_the_daemons_own_user_may_change_and_other_users_may_not(run_dir, calls):
    """A server running as nobody: nobody may change, uid 4243 may not, root may."""
    os.chmod(run_dir, 0o777)  # nobody creates its socket here
    path = os.path.join(run_dir, "own.sock")
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(stop_w)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            server = ControlServer(path, socket_mode=0o666)
            register_test_methods(server, Calls())
            server.serve()
            os.write(ready_w, b"1")
            os.read(stop_r, 1)  # until the test closes its end
            server.close()
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(stop_r)
    try:
        assert os.read(ready_r, 1) == b"1", "the server running as nobody did not start"
        assert os.stat(path).st_uid == NOBODY
        (same_user,) = run_as(NOBODY, NOBODY, [], calls_from(path, READ_AND_CHANGE[1]))
        assert same_user["result"] == {"mode": "drop"}
        (stranger,) = run_as(OTHER_UID, OTHER_UID, [], calls_from(path, READ_AND_CHANGE[1]))
        assert "only root and uid 65534 (nobody)" in error_of(stranger)["message"]
        assert Client(path).call(*READ_AND_CHANGE[1])["result"] == {"mode": "drop"}  # root
    finally:
        os.close(stop_w)
        _, status = os.waitpid(pid, 0)
        os.close(ready_r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not os.path.exists(path)


# ---------------------------------------------------------------------------- fairness
@contextlib.contextmanager
def connections_held_by(uid, groups, path, count):
    """A child forked as `uid` (gid nobody, supplementary `groups`) opens `count`
    connections one after the other and holds them until the block ends; yields what it
    saw: {"served": connections that answered a call, "refused": the BUSY messages}."""
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(report_r)
            os.close(release_w)
            os.setgroups(list(groups))
            os.setgid(NOBODY)
            os.setuid(uid)
            served, refused, held = 0, [], []
            for _ in range(count):
                client = Client(path, timeout=30)
                with contextlib.suppress(BrokenPipeError):  # refused: closed already
                    client.send(
                        b'{"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"text": "in"}}\n'
                    )
                reply = client.reply()  # a refused connection's BUSY line is there to read
                if "result" in reply:
                    served += 1
                    held.append(client)
                else:
                    refused.append(reply["error"])
            os.write(report_w, json.dumps({"served": served, "refused": refused}).encode())
            os.close(report_w)
            os.read(release_r, 1)  # until the test closes its end
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(release_r)
    try:
        with os.fdopen(report_r, "rb") as report:
            data = report.read()
        assert data, "the child holding connections failed"
        yield json.loads(data)
    finally:
        os.close(release_w)
        os.waitpid(pid, 0)


GROUP_MEMBERS = (NOBODY, OTHER_UID, OTHER_UID + 1, OTHER_UID + 2)  # all in OPS_GID


@needs_root
def test_group_members_holding_every_slot_they_may_never_lock_out_root(serve):
    """Each uid other than root and the daemon's gets at most 16 connections, and all of
    them together 56 of the 64: four group members taking all they can leave root 8."""
    server = serve(socket_mode=0o666, socket_group=OPS_GID)
    with contextlib.ExitStack() as held:
        seen = [
            held.enter_context(connections_held_by(uid, [OPS_GID], server.path, 20))
            for uid in GROUP_MEMBERS
        ]
        assert [s["served"] for s in seen] == [16, 16, 16, 8]
        assert [len(s["refused"]) for s in seen] == [4, 4, 4, 12]
        per_user = seen[0]["refused"][0]
        assert per_user["code"] == ErrorCode.BUSY
        assert "too many connections of uid 65534 (16, the limit per user)" in per_user["message"]
        shared = seen[3]["refused"][0]["message"]
        assert "56 connections of users other than root and the daemon's" in shared
        roots = [Client(server.path) for _ in range(8)]
        for client in roots:
            assert client.call("echo", {"text": "root"})["result"] == {"text": "root"}
        assert server.client_count == 64
        refused = Client(server.path).reply()  # now even root: every slot is taken
        assert "too many clients (64 connected, the limit)" in error_of(refused)["message"]
        roots.pop().close()
        wait_until(lambda: server.client_count == 63, what="root's slot to free")
        assert Client(server.path).call("echo", {"text": "again"})["result"] == {"text": "again"}


def test_a_batch_over_the_limit_is_refused_whole_before_any_request_runs(serve, calls):
    client = Client(serve(max_batch=4).path)
    batch = [
        {"jsonrpc": "2.0", "id": i, "method": "echo", "params": {"text": str(i)}} for i in range(5)
    ]
    error = error_of(client.request(batch))
    assert error["code"] == ErrorCode.INVALID_REQUEST
    assert "a batch of 5 requests; at most 4 in one line" in error["message"]
    assert calls.log == []
    assert [r["result"] for r in client.request(batch[:4])] == [{"text": str(i)} for i in range(4)]


@needs_root
def test_a_batch_of_slow_calls_takes_turns_with_another_users_request(serve, calls):
    """A group member's batch of 32 calls of 50 ms each: root's call, sent while the batch
    runs, is answered between two of its calls, not after the whole batch (1.6 s)."""
    server = serve(socket_mode=0o666, socket_group=OPS_GID)
    batch = [
        {"jsonrpc": "2.0", "id": i, "method": "slow", "params": {"seconds": 0.05}}
        for i in range(32)
    ]

    def flood():
        client = Client(server.path, timeout=60)
        return len(client.request(batch))

    member = threading.Thread(target=run_as, args=(NOBODY, NOBODY, [OPS_GID], flood))
    member.start()
    try:
        wait_until(lambda: calls.log, 20, "the batch to run")
        assert Client(server.path).call("echo", {"text": "root"})["result"] == {"text": "root"}
    finally:
        member.join(60)
    names = [name for name, _ in calls.log]
    assert names.count("slow") == 32
    assert names.index("echo") < 31, f"root waited for the whole batch: {names}"


def test_replies_a_client_leaves_unread_stay_bounded(serve):
    """A client that sends batch after batch and reads nothing: its work stops once
    max_unsent bytes of replies wait for it; the server holds no more than that and one
    reply line (a batch of at most max_batch results), however much it sends."""
    server = serve(max_unsent=64 * 1024, idle_timeout=30)
    hog = Client(server.path)
    big = {"text": "x" * 40, "times": 100}  # a 4 kB result
    lines = [
        json.dumps([{"jsonrpc": "2.0", "id": i, "method": "echo", "params": big}] * n).encode()
        + b"\n"
        for i, n in enumerate((500, 32))  # over the batch limit (as the attack was), at it
    ]
    assert len(lines[0]) < server.max_line
    stuck = threading.Event()

    def flood():
        hog.sock.settimeout(2)
        try:
            for _ in range(10_000):
                for line in lines:
                    hog.send(line)
        except (TimeoutError, OSError):
            stuck.set()  # the server stopped reading: the socket buffers are full

    flooder = threading.Thread(target=flood)
    flooder.start()
    flooder.join(60)
    assert stuck.is_set(), "the server kept reading from a client that reads nothing"
    (writer,) = server._connections.values()
    unsent = writer.transport.get_write_buffer_size()
    assert unsent <= 64 * 1024 + 32 * 4100, unsent
    assert Client(server.path).call("echo", {"text": "x"})["result"] == {"text": "x"}


@needs_root
def test_refused_requests_are_logged_at_most_a_burst_per_interval(serve, caplog):
    """One line of 32 requests nobody may make, and 40 refused connections: at most
    LOG_BURST records for the uid, and one more that counts the rest."""
    server = serve(socket_mode=0o666, socket_group=OPS_GID, max_clients_per_uid=1)
    server._log_budget.interval = 3.0  # the default 10 s, shortened for the test
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "set_mode", "params": {"mode": "drop"}}] * 32

    def attack():
        holder = Client(server.path)
        refused = [Client(server.path).reply()["error"]["code"] for _ in range(40)]
        return refused, [r["error"]["code"] for r in holder.request(batch)]

    with caplog.at_level(logging.INFO, logger="ixyd.control"):
        refused, answers = run_as(NOBODY, NOBODY, [OPS_GID], attack)
        assert refused == [ErrorCode.BUSY] * 40 and answers == [ErrorCode.UNAUTHORIZED] * 32
        wait_until(
            lambda: any("not logged" in r.getMessage() for r in caplog.records),
            10,
            "the sum of what was held back",
        )
    about = [r.getMessage() for r in caplog.records if "65534" in r.getMessage()]
    assert len(about) == LOG_BURST + 1, about
    assert f"{72 - LOG_BURST} more records about uid 65534 not logged" in about[-1]


# ---------------------------------------------------------------------------- socket files
@needs_root
def test_serve_creates_the_directory_0755_and_the_socket_0660_in_its_group(run_dir):
    path = os.path.join(run_dir, "sub", "dir", "demo.sock")
    with ControlServer(path, socket_group=OPS_GID) as server:
        server.serve()
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == OPS_GID
    assert not os.path.exists(path)


def test_a_stale_socket_is_replaced(run_dir, calls):
    path = os.path.join(run_dir, "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # a killed daemon leaves its socket file behind
    dead.close()
    with ControlServer(path) as server:
        register_test_methods(server, calls)
        server.serve()
        assert Client(path).call("echo", {"text": "new"})["result"] == {"text": "new"}


def test_a_socket_something_listens_on_is_not_taken_over(serve, run_dir):
    first = serve(name="live")
    second = ControlServer(first.path)
    with pytest.raises(ControlError, match=rf"another process \(pid {os.getpid()}\) is listen"):
        second.serve()
    second.close()
    assert os.path.exists(first.path)
    assert Client(first.path).call("echo", {"text": "first"})["result"] == {"text": "first"}


def test_a_path_that_is_not_a_socket_is_left_alone(run_dir):
    path = os.path.join(run_dir, "file.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(path).serve()
    with open(path) as f:
        assert f.read() == "precious"


def test_close_does_not_remove_a_socket_that_replaced_ours(serve):
    server = serve()
    os.unlink(server.path)
    newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newcomer.bind(server.path)
    server.close()
    assert os.path.exists(server.path)
    newcomer.close()


def test_close_is_idempotent_and_a_closed_server_does_not_serve_again(serve):
    server = serve()
    server.close()
    server.close()
    assert not server.serving and not os.path.exists(server.path)
    with pytest.raises(RuntimeError):
        server.serve()


def test_a_handler_may_close_the_server_and_still_gets_its_answer_out(run_dir):
    path = os.path.join(run_dir, "stop.sock")
    server = ControlServer(path)

    def shutdown():
        server.close()
        return {"stopping": True}

    server.register("shutdown", shutdown, params_schema={}, mutating=True)
    server.serve()
    assert Client(path).call("shutdown")["result"] == {"stopping": True}
    wait_until(lambda: not server.serving, what="the server thread to end")
    assert not os.path.exists(path)
    server.close()


def test_registering_a_name_twice_or_a_reserved_name_is_refused(run_dir):
    server = ControlServer(os.path.join(run_dir, "x.sock"))
    server.register("a", lambda: 1, params_schema={}, mutating=False)
    with pytest.raises(ValueError, match="already registered"):
        server.register("a", lambda: 2, params_schema={}, mutating=False)
    with pytest.raises(ValueError, match="reserved"):
        server.register("rpc.discover", lambda: 2, params_schema={}, mutating=False)
    with pytest.raises(TypeError, match="give a Param"):
        server.register("b", lambda x: x, params_schema={"x": str}, mutating=False)


def test_socket_path_refuses_names_that_are_not_file_names(monkeypatch):
    monkeypatch.delenv("IXYD_RUN_DIR", raising=False)
    assert socket_path("0000:03:00.0") == "/run/ixyd/0000:03:00.0.sock"
    monkeypatch.setenv("IXYD_RUN_DIR", "/tmp/x")
    assert socket_path("demo") == "/tmp/x/demo.sock"
    for bad in ("../etc/passwd", "a/b", "", ".hidden", "demo\n"):
        with pytest.raises(ConfigError):
            socket_path(bad)


# ---------------------------------------------------------------------------- socket activation
ACTIVATED_DAEMON = textwrap.dedent(
    """
    import sys, threading
    if sys.argv[1] == "no-systemd-python":
        sys.modules["systemd"] = None  # force the pure-Python fallback
    from ixyd.control import ControlServer
    from ixyd.errors import IxydError
    try:
        server = ControlServer.for_instance("act", run_dir=sys.argv[2])
    except IxydError as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
    stop = threading.Event()
    server.register("where", lambda: {"activated": server.activated, "path": server.path,
                                      "fd": server._listen_socket.fileno()},
                    params_schema={}, mutating=False)
    server.register("shutdown", lambda: stop.set(), params_schema={}, mutating=True)
    server.serve()
    stop.wait(30)
    server.close()
    """
)


def write_daemon_script(directory):
    script = os.path.join(directory, "daemon.py")
    with open(script, "w") as f:
        f.write(ACTIVATED_DAEMON)
    return script


def check_activated_daemon(daemon, path, unused_dir):
    client = Client(path, timeout=20)
    where = client.call("where")["result"]
    assert where == {"activated": True, "path": path, "fd": 3}
    assert client.call("shutdown")["result"] is None
    assert daemon.wait(20) == 0, daemon.stderr.read()
    assert os.path.exists(path), "the daemon removed a socket it did not create"
    assert os.listdir(unused_dir) == [], "the daemon made its own socket instead"


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate"
)
def test_socket_activation_through_systemd_socket_activate(run_dir):
    path = os.path.join(run_dir, "act.sock")
    unused = os.path.join(run_dir, "unused")
    os.mkdir(unused)
    script = write_daemon_script(run_dir)
    daemon = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, "--fdname=control"]
        + [sys.executable, script, "systemd-python", unused],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: os.path.exists(path), what="systemd-socket-activate to listen")
        # it starts the daemon on the first connection, handing over the listening socket
        check_activated_daemon(daemon, path, unused)
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stderr.close()


def sd_listen_wrapper(names):
    """sh that moves its stdin (the listening socket) to fd 3 and sets LISTEN_* for the
    process it execs, as systemd does (LISTEN_PID is the shell's pid, kept across exec)."""
    return [
        "sh",
        "-c",
        'exec 3<&0 </dev/null; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES="$0"; exec "$@"',
        names,
    ]


@pytest.mark.parametrize("variant", ["systemd-python", "no-systemd-python"])
def test_socket_activation_through_an_inherited_fd(run_dir, variant):
    path = os.path.join(run_dir, "act.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    unused = os.path.join(run_dir, "unused")
    os.mkdir(unused)
    script = write_daemon_script(run_dir)
    daemon = subprocess.Popen(
        [*sd_listen_wrapper("control"), sys.executable, script, variant, unused],
        stdin=listener.fileno(),
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()  # the daemon holds the only listening fd now
    try:
        check_activated_daemon(daemon, path, unused)
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stderr.close()


def test_an_activated_socket_that_is_not_a_stream_socket_is_refused(run_dir):
    path = os.path.join(run_dir, "dgram.sock")
    wrong = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    wrong.bind(path)
    script = write_daemon_script(run_dir)
    daemon = subprocess.run(
        [*sd_listen_wrapper("control"), sys.executable, script, "no-systemd-python", run_dir],
        stdin=wrong.fileno(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    wrong.close()
    assert daemon.returncode == 3
    assert "is AF_UNIX/SOCK_DGRAM, not a Unix stream socket" in daemon.stderr


def test_listen_fds_fallback_follows_sd_listen_fds():
    pid = os.getpid()
    assert _listen_fds_from_environment({}, pid) == {}
    other = {"LISTEN_PID": str(pid + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"}
    assert _listen_fds_from_environment(other, pid) == {}  # meant for another process
    colon = {"LISTEN_PID": str(pid), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ixyd@0000:03:00.0"}
    with pytest.raises(ActivationError, match="FileDescriptorName=control"):
        _listen_fds_from_environment(colon, pid)
