"""A real S3-compatible server over HTTP for the object-storage tests (and benchmarks/s3_store.py).

moto in server mode (`ThreadedMotoServer`, a werkzeug server in a thread of this process), with
IAM authentication switched on: the server checks every request's signature against an access
key made through its IAM API, so wrong credentials are refused as a real S3 refuses them. The
buckets live in this process, so stopping the server and starting it again on the same port
keeps them (what the "server stopped mid-run" test needs). It counts requests and the bytes it
sends back per (method, path prefix), through a WSGI wrapper that sees what goes over the wire.
`S3ServerProcess` runs the same server in a child process (the benchmark's: off the measured GIL).

Import the fixture into a test module: `from s3_server import s3  # noqa: F401`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

BUCKET = "kdlib-test"
REGION = "us-east-1"
TRAFFIC_PATH = "/_kdlib_traffic"  # the counting wrapper answers here (S3ServerProcess's counters)


@dataclass
class Traffic:
    """Requests and response bytes the server handled, by HTTP method; and the commit records read
    (one per chunk a store reads: `Store.read_chunk` checks a chunk against its record)."""

    requests: Counter = field(default_factory=Counter)
    bytes_out: Counter = field(default_factory=Counter)
    commits_read: Counter = field(default_factory=Counter)  # object path -> GETs
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bytes_out.clear()
            self.commits_read.clear()

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self.lock:
            return dict(self.requests), dict(self.bytes_out)


class _Counting:
    """WSGI middleware: counts each request and the bytes of its response body."""

    def __init__(self, app: Any, traffic: Traffic) -> None:
        self.app, self.traffic = app, traffic

    def __call__(self, environ: dict, start_response: Any) -> Iterator[bytes]:
        method, path = environ.get("REQUEST_METHOD", "?"), environ.get("PATH_INFO", "")
        if path in (TRAFFIC_PATH, TRAFFIC_PATH + "/reset"):  # S3ServerProcess asks; not counted
            if path.endswith("/reset"):
                self.traffic.reset()
            with self.traffic.lock:
                body = json.dumps(
                    {
                        "requests": self.traffic.requests,
                        "bytes_out": self.traffic.bytes_out,
                        "commits_read": self.traffic.commits_read,
                    }
                ).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return iter([body])
        return self._counted(method, path, environ, start_response)

    def _counted(self, method: str, path: str, environ: dict, start_response: Any) -> Iterator[bytes]:
        with self.traffic.lock:
            self.traffic.requests[method] += 1
            if method == "GET" and "/commits/e" in path:
                self.traffic.commits_read[path] += 1
        for part in self.app(environ, start_response):
            with self.traffic.lock:
                self.traffic.bytes_out[method] += len(part)
            yield part


class _Client:
    """What a client needs of a server: its endpoint and credentials, as variables, options, a filesystem."""

    endpoint: str
    key: str
    secret: str

    def env(self, **overrides: str) -> dict[str, str]:
        """The standard AWS variables that point s3fs/botocore at this server with these credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            **overrides,
        }

    def options(self) -> dict[str, Any]:
        """The same as fsspec storage options (what `--storage-options` takes)."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def fs(self):
        import fsspec

        return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, **self.options())

    def url(self, name: str) -> str:
        return f"s3://{BUCKET}/{name}"


class S3Server(_Client):
    """moto's S3 over HTTP on 127.0.0.1, with one IAM user's credentials and a bucket."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request

        self._cls = ThreadedMotoServer
        self.traffic = Traffic()
        self.port = 0
        self._server = None
        self.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.key, self.secret = self._credentials()
        self.fs().mkdir(BUCKET)

    def start(self) -> None:
        server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        http = server._server
        http.app = _Counting(http.app, self.traffic)  # werkzeug's server calls .app
        conns: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        accept = http.process_request

        def tracked(request: socket.socket, client_address: Any) -> None:
            conns.add(request)
            accept(request, client_address)

        http.process_request = tracked
        self._server, self._conns = server, conns
        self.port = server.get_host_and_port()[1]

    def stop(self) -> None:
        """Go down as a crashed server does: the port closed (a new connection meets "connection refused") and
        every open connection cut (werkzeug's handler threads would otherwise go on serving kept-alive ones)."""
        if self._server is not None:
            http = self._server._server
            self._server.stop()
            http.server_close()
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:  # closed already
                    pass
            self._server = None

    def restart(self) -> None:
        """Start again on the same port (buckets and objects are kept: they live in this process)."""
        for _attempt in range(50):
            try:
                self.start()
                return
            except OSError:  # the port not yet free again
                time.sleep(0.1)
        self.start()

    def _credentials(self) -> tuple[str, str]:
        import boto3
        from moto import settings
        from moto.core.authorization import ActionAuthenticatorMixin

        # these three IAM calls, then every request is checked (moto counts requests per process: start at 0)
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 3
        ActionAuthenticatorMixin.request_count = 0
        iam = boto3.client(
            "iam", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
        )
        iam.create_user(UserName="kdlib")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="kdlib", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="kdlib")["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]


class _RemoteTraffic:
    """`Traffic`'s reads and reset, asked of the server process over HTTP."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def _get(self, path: str) -> dict[str, dict[str, int]]:
        import urllib.request

        with urllib.request.urlopen(self.endpoint + path, timeout=30) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        self._get(TRAFFIC_PATH + "/reset")

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        got = self._get(TRAFFIC_PATH)
        return got["requests"], got["bytes_out"]

    @property
    def commits_read(self) -> dict[str, int]:
        return self._get(TRAFFIC_PATH)["commits_read"]


def _serve(conn: Any) -> None:
    server = S3Server()
    conn.send((server.endpoint, server.key, server.secret))
    conn.recv()  # until told to stop
    server.stop()


class S3ServerProcess(_Client):
    """The same server in a child process (benchmarks/s3_store.py): its Python work, moto's parsing and
    signature checks, does not hold the measured process's GIL, as a remote server's would not. Its
    counters are read over HTTP (`traffic.snapshot()`, `traffic.commits_read`, `traffic.reset()`)."""

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        self.endpoint, self.key, self.secret = self._conn.recv()
        self.traffic = _RemoteTraffic(self.endpoint)

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(30)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One S3 server for the session; the test process's AWS variables point at it while it runs."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
