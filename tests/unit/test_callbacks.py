"""Callback hosts allow-list and redirect refusal (no Ray)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from serve_app.config import JobsConfig
from serve_app.jobs.records import callback_host_allowed, post_callback


@pytest.mark.parametrize("host,allowed,expected", [
    ("hooks.example.com", None, True),  # no list: any host
    ("10.0.0.5", None, True),
    ("hooks.example.com", [], False),  # an empty list: none
    ("hooks.example.com", ["hooks.example.com"], True),
    ("HOOKS.Example.com.", ["hooks.example.com"], True),
    ("evil.com", ["hooks.example.com"], False),
    ("hooks.example.com.evil.com", ["hooks.example.com"], False),
    ("a.example.com", ["*.example.com"], True),
    ("b.a.example.com", ["*.example.com"], True),
    ("example.com", ["*.example.com"], False),
    ("badexample.com", ["*.example.com"], False),
    ("127.0.0.1", ["127.0.0.1"], True),
    ("[::1]", ["::1"], True),
    ("169.254.169.254", ["127.0.0.1", "*.example.com"], False),
    (None, ["example.com"], False),
])
def test_callback_host_allowed(host, allowed, expected):
    assert callback_host_allowed(host, allowed) is expected


def test_callback_hosts_config_rejects_urls_and_ports():
    assert JobsConfig(callback_hosts=["hooks.example.com", "*.corp.example", "10.0.0.7",
                                      "::1"]).callback_hosts[1] == "*.corp.example"
    for bad in ("https://hooks.example.com", "hooks.example.com:8443", "a/b", "*", "",
                "foo.*.com", "user@host"):
        with pytest.raises(ValidationError, match="callback_hosts"):
            JobsConfig(callback_hosts=[bad])


class _Redirecting(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        type(self).hits.append(self.path)
        if self.path == "/hook":
            self.send_response(307)
            self.send_header("Location", "/internal")
        else:
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_callbacks_do_not_follow_redirects():
    _Redirecting.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        # The receiver is on loopback: only allow_private lets a callback reach it.
        assert post_callback(f"{base}/hook", {"id": "x"}, attempts=2, backoff_s=0,
                             allow_private=True) is False
        assert _Redirecting.hits == ["/hook", "/hook"]  # never /internal
        assert post_callback(f"{base}/internal", {"id": "x"}, attempts=1, backoff_s=0,
                             allow_private=True)
    finally:
        server.shutdown()
