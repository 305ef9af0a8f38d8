"""The outbound guard (serve_app/outbound.py) for job callbacks: no callback reaches
loopback, private, link-local, carrier-grade NAT (metadata) or reserved addresses, at
submission or when sent (DNS rebinding), unless jobs.callback_allow_private.

Only loopback ever receives traffic here: a real receiver on 127.0.0.1 / ::1 that must get
nothing. Private, link-local and metadata addresses are given by a stub resolver and met
by a stub connector that records and refuses: nothing is sent to them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest
from serve_app.jobs.records import JobRequest, post_callback
from serve_app.jobs.service import JobRunner, JobService
from serve_app.outbound import BlockedDestination, check_url, literal_address, open_connection
from serve_app.store import ImageStore
from tests.unit.test_services import DictKeys, ListQueue

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


class Receiver(BaseHTTPRequestHandler):
    """Records every request it gets: (path, Host header)."""

    hits: list[tuple[str, str]]

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        self.hits.append((self.path, self.headers["host"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _serve(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """One port on 127.0.0.1 and, where the host has IPv6 loopback, on ::1 too; both record
    into one list."""
    hits: list[tuple[str, str]] = []
    handler = type("Handler", (Receiver,), {"hits": hits})
    v4 = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = v4.server_address[1]
    servers = [v4]
    try:
        servers.append(_V6Server(("::1", port), handler))
    except OSError:
        pass  # no IPv6 loopback here: [::1] is refused before any connection anyway
    for server in servers:
        _serve(server)
    yield port, hits
    for server in servers:
        server.shutdown()
        server.server_close()


LOOPBACK_SPELLINGS = ["127.0.0.1", "localhost", "[::1]", "127.1", "0x7f000001", "2130706433",
                      "[::ffff:127.0.0.1]", "0177.0.0.1", "127.0.0.2"]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_loopback_spelling_is_refused_and_the_receiver_gets_nothing(receiver, host):
    port, hits = receiver
    url = f"http://{host}:{port}/hook"
    with pytest.raises(BlockedDestination, match="loopback"):
        check_url(url)
    assert post_callback(url, {"id": "x"}, attempts=2, backoff_s=0) is False
    # At submission: what the ingress does with a job's callbackUrl (parsed as JobRequest).
    jobs = JobService(ImageStore(f"memory://{uuid.uuid4().hex}/s"), AppConfig(), ListQueue(),
                      DictKeys())
    body = JobRequest.model_validate({"prompt": "p", "callbackUrl": url})
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(jobs.submit(body, None, "http://h"))
    assert info.value.field == "callbackUrl"
    assert info.value.message.startswith("callbackUrl cannot be called: ")
    assert " is a loopback address" in info.value.message
    assert info.value.message.endswith(
        "; this service calls public addresses only (jobs.callback_allow_private)")
    assert hits == []


@pytest.mark.parametrize("host", ["127.1", "0x7f000001", "2130706433", "[::ffff:127.0.0.1]"])
def test_the_receiver_is_reachable_when_private_addresses_are_allowed(receiver, host):
    """The control for the test above: the same spellings do reach the receiver with
    allow_private, so "got nothing" there means "refused", not "unreachable"."""
    port, hits = receiver
    assert post_callback(f"http://{host}:{port}/hook", {"id": "x"}, attempts=1, backoff_s=0,
                         allow_private=True) is True
    assert [path for path, _ in hits] == ["/hook"]


@pytest.mark.parametrize("host,expected", [
    ("127.1", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("2130706433", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("10.1", "10.0.0.1"), ("hooks.example.com", None)])
def test_numeric_hosts_read_as_the_resolver_reads_them(host, expected):
    address = literal_address(host)
    assert (str(address) if address else None) == expected


class StubResolver:
    """Answers from a table, each name's answers in turn (the last one repeats)."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = {name: list(answers) for name, answers in table.items()}
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answers = self.table[host]
        return answers.pop(0) if len(answers) > 1 else answers[0]


class RefusingConnector:
    """Records where a connection would go and refuses it: nothing leaves the machine."""

    def __init__(self) -> None:
        self.addresses: list[tuple[str, int]] = []

    def __call__(self, address: tuple[str, int], timeout: float) -> socket.socket:
        self.addresses.append(address)
        raise ConnectionRefusedError("stub connector")


@pytest.mark.parametrize("address,reason", [
    ("10.0.0.5", "a private address"),
    ("172.16.3.4", "a private address"),
    ("192.168.1.1", "a private address"),
    ("169.254.169.254", "a link-local address"),
    ("100.100.100.200", "a carrier-grade NAT address"),
    ("100.64.0.1", "a carrier-grade NAT address"),
    ("0.0.0.0", "the unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("240.0.0.1", "a reserved address"),
    ("192.0.2.10", "a special-purpose address"),  # documentation range
    ("198.18.0.1", "a special-purpose address"),  # benchmarking range
    ("fd00::1", "a private address"),
    ("fe80::1", "a link-local address"),
    ("ff02::1", "a multicast address"),
    ("::", "the unspecified address"),
    ("::ffff:10.0.0.1", "a private address (10.0.0.1 in IPv6 form)"),
    ("64:ff9b::a9fe:a9fe", "a link-local address (cloud metadata services live there) "
                           "(169.254.169.254 in IPv6 form)"),  # NAT64 of 169.254.169.254
    ("2002:a9fe:a9fe::1", "a link-local address (cloud metadata services live there) "
                          "(169.254.169.254 in IPv6 form)"),  # 6to4 of 169.254.169.254
])
def test_internal_addresses_behind_a_name_are_refused_without_a_connection(address, reason):
    resolver, connector = StubResolver({"hooks.example.com": [[address]]}), RefusingConnector()
    url = "https://hooks.example.com/hook"
    with pytest.raises(BlockedDestination) as info:
        check_url(url, resolver=resolver)
    shown = ipaddress.ip_address(address)
    assert info.value.reason.startswith(f"hooks.example.com ({shown}) is {reason}")
    assert post_callback(url, {"id": "x"}, attempts=3, backoff_s=0, resolver=resolver,
                         connector=connector) is False
    assert connector.addresses == []
    # allow_private: the same address is allowed (the stub connector then refuses it).
    assert check_url(url, allow_private=True, resolver=resolver).address == str(shown)


@pytest.mark.parametrize("host", ["169.254.169.254", "100.100.100.200", "10.0.0.1", "[fd00::1]",
                                  "[::ffff:169.254.169.254]"])
def test_internal_address_literals_are_refused_without_asking_the_resolver(host):
    resolver = StubResolver({})
    with pytest.raises(BlockedDestination, match="this service calls public addresses only"):
        check_url(f"http://{host}/latest/meta-data", resolver=resolver)
    assert resolver.asked == []


def test_a_name_with_one_public_and_one_private_address_is_refused():
    resolver = StubResolver({"mixed.example.com": [[PUBLIC_V4, "10.0.0.7"]]})
    with pytest.raises(BlockedDestination, match=r"\(10.0.0.7\) is a private address"):
        check_url("http://mixed.example.com/", resolver=resolver)


def test_public_addresses_are_allowed():
    resolver = StubResolver({"hooks.example.com": [[PUBLIC_V4, PUBLIC_V6]]})
    dest = check_url("https://hooks.example.com:8443/a/b?c=1", resolver=resolver)
    assert (dest.scheme, dest.host, dest.port, dest.address, dest.target) == (
        "https", "hooks.example.com", 8443, PUBLIC_V4, "/a/b?c=1")


@pytest.mark.parametrize("url,reason", [
    ("ftp://hooks.example.com/x", "only http and https URLs can be called"),
    ("http:///x", "the URL has no host"),
    ("http://nowhere.invalid/x", "the host nowhere.invalid does not resolve"),
])
def test_urls_that_cannot_be_called(url, reason):
    def resolver(host, port):
        raise socket.gaierror("no such name")
    with pytest.raises(BlockedDestination) as info:
        check_url(url, resolver=resolver)
    assert info.value.reason == reason


def test_the_connection_goes_to_the_checked_address_not_a_second_answer():
    """DNS rebinding within one send: the name answers public, then loopback. Each attempt
    resolves once and connects to the address it checked."""
    resolver = StubResolver({"rebind.example.com": [[PUBLIC_V4], ["127.0.0.1"]]})
    connector = RefusingConnector()
    assert post_callback("http://rebind.example.com:8080/hook", {"id": "x"}, attempts=1,
                         backoff_s=0, resolver=resolver, connector=connector) is False
    assert connector.addresses == [(PUBLIC_V4, 8080)]
    assert resolver.asked == ["rebind.example.com"]


def test_the_checked_address_gets_the_original_host_header(receiver):
    """allow_private, a name the stub resolves to 127.0.0.1: the request reaches that
    address (the real receiver), with the URL's host in the Host header."""
    port, hits = receiver
    resolver = StubResolver({"hooks.example.test": [["127.0.0.1"]]})
    assert post_callback(f"http://hooks.example.test:{port}/hook", {"id": "x"}, attempts=1,
                         backoff_s=0, allow_private=True, resolver=resolver) is True
    assert hits == [("/hook", f"hooks.example.test:{port}")]


def test_https_verifies_the_url_host_name_on_the_checked_address():
    dest = check_url("https://hooks.example.com/h",
                     resolver=StubResolver({"hooks.example.com": [[PUBLIC_V4]]}))
    connector = RefusingConnector()
    conn = open_connection(dest, 5.0, connector)
    # HTTPSConnection wraps the socket with server_hostname=conn.host: the URL's name.
    assert (type(conn).__name__, conn.host, conn.port) == ("HTTPSConnection",
                                                          "hooks.example.com", 443)
    with pytest.raises(ConnectionRefusedError):
        conn.connect()
    assert connector.addresses == [(PUBLIC_V4, 443)]


def test_a_callback_allowed_at_submission_is_refused_when_its_name_turns_to_loopback(receiver):
    """Submission sees a public address; by the time the job ends the name resolves to
    loopback (DNS rebinding): the runner refuses to send, the receiver gets nothing, and
    the record says the callback was not delivered."""
    port, hits = receiver
    store = ImageStore(f"memory://{uuid.uuid4().hex}/s")
    config = AppConfig.model_validate({"jobs": {"callback_attempts": 2,
                                                "callback_backoff_s": 0}})
    resolver = StubResolver({"hooks.example.com": [[PUBLIC_V4], ["127.0.0.1"]]})
    queue = ListQueue()
    jobs = JobService(store, config, queue, DictKeys(), resolver=resolver)

    async def generate(body, request_id, seed, base_url, on_call_done=None, **kwargs):
        on_call_done(1)
        return {"id": request_id, "output": []}

    runner = JobRunner(store, config, generate, resolver=resolver)
    body = JobRequest.model_validate({"prompt": "p",
                                      "callbackUrl": f"http://hooks.example.com:{port}/h"})

    async def main():
        record, created = await jobs.submit(body, None, "http://h")
        assert created
        assert await runner.run(*queue.jobs[0]) == "succeeded"
        return await jobs.status(record.id)

    record = asyncio.run(main())
    assert (record.status, record.callbackDelivered) == ("succeeded", False)
    assert resolver.asked == ["hooks.example.com", "hooks.example.com"]
    assert hits == []


def test_callback_hosts_and_the_address_check_both_apply():
    """An allow-listed name is still refused when it resolves inside; allow_private does
    not open hosts the allow-list leaves out."""
    resolver = StubResolver({"hooks.corp.example": [["10.1.2.3"]]})
    store = ImageStore(f"memory://{uuid.uuid4().hex}/s")

    def submit(**jobs_cfg):
        config = AppConfig.model_validate({"jobs": jobs_cfg})
        service = JobService(store, config, ListQueue(), DictKeys(), resolver=resolver)
        body = JobRequest.model_validate({"prompt": "p",
                                          "callbackUrl": "http://hooks.corp.example/h"})
        return asyncio.run(service.submit(body, None, "http://h"))

    with pytest.raises(InvalidRequest) as info:
        submit(callback_hosts=["hooks.corp.example"])
    assert info.value.message == (
        "callbackUrl cannot be called: hooks.corp.example (10.1.2.3) is a private address; "
        "this service calls public addresses only (jobs.callback_allow_private)")
    with pytest.raises(InvalidRequest, match=r"\(jobs.callback_hosts\)"):
        submit(callback_hosts=["other.example"], callback_allow_private=True)
    record, created = submit(callback_hosts=["hooks.corp.example"],
                             callback_allow_private=True)
    assert created and record.callbackUrl == "http://hooks.corp.example/h"
