"""`imageUrl`: the image-to-image input fetched by the ingress (serve_app/ingress/image_url.py)
through the outbound guard of job callbacks (serve_app/outbound.py fetch): the same image
as sent inline, within the size and time limits, a few redirects each checked, then the
checks of an uploaded image.

Only loopback ever receives traffic: an image server the test starts on 127.0.0.1, reached
with ingress.image_url.allow_private set. Where the opt-in must be off (redirects to
loopback, private or metadata addresses), a stub resolver names a public address and a stub
connector takes that one address to the loopback server and records and refuses every
other: nothing is sent to them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.errors import (
    ImageUrlFailed,
    ImageUrlRefused,
    InvalidImage,
    InvalidRequest,
    PayloadTooLarge,
)
from serve_app.generation.schemas import Image2ImageRequest
from serve_app.generation.service import GenerationService
from serve_app.ingress.deployment import build_http_app
from serve_app.ingress.image_url import fetch_input_image
from serve_app.ingress.openai_api import OpenAIEditRequest
from serve_app.ingress.parsing import read_request
from serve_app.ingress.services import IngressServices
from serve_app.jobs.records import Image2ImageJobRequest, JobRequest, request_model
from serve_app.jobs.service import JobRunner, JobService
from serve_app.model.input_image import decode_input_image
from serve_app.outbound import fetch
from serve_app.protocol import GenerationItem, ModelResult
from serve_app.store import ImageStore
from serve_app.testing import FakeGenerator
from tests.unit.test_input_images import png
from tests.unit.test_outbound import PUBLIC_V4, StubResolver
from tests.unit.test_request_parsing import http_request
from tests.unit.test_services import DictKeys, ListQueue

IMAGE = png(96, 80, color=(12, 140, 220))
OTHER_IMAGE = png(96, 80, color=(250, 200, 10))
# Small enough that the oversized bodies below stay small.
MAX_BYTES = 64 * 1024
BIG = b"\x89PNG\r\n\x1a\n" + bytes(3 * MAX_BYTES)


def config(**image_url) -> AppConfig:
    """The test's config: loopback allowed (the image server is there) unless told."""
    return AppConfig.model_validate({
        "limits": {"max_input_image_bytes": MAX_BYTES},
        "ingress": {"image_url": {"allow_private": True, "timeout_s": 5.0, **image_url}}})


class ImageServer:
    """A loopback HTTP server: path -> what it answers (`routes`), every request recorded
    as (path with query, Host header)."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                server.hits.append((self.path, self.headers["host"]))
                route = server.routes.get(urlsplit(self.path).path)
                if route is None:
                    send(self, 404, b"no such image")
                else:
                    route(self)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, *,
         headers: dict[str, str] | None = None, length: int | None = -1) -> None:
    """length -1: the true Content-Length; None: none (the body ends with the connection);
    else that (lying) number."""
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if length == -1:
        handler.send_header("Content-Length", str(len(body)))
    elif length is not None:
        handler.send_header("Content-Length", str(length))
    if length is None:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except OSError:
        pass  # the client stopped reading (a refused body): what the tests expect
    handler.close_connection = True


def chunked(handler: BaseHTTPRequestHandler, body: bytes, *, lying_length: int | None = None):
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    if lying_length is not None:
        handler.send_header("Content-Length", str(lying_length))
    handler.end_headers()
    try:
        for start in range(0, len(body), 8192):
            part = body[start:start + 8192]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        handler.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass
    handler.close_connection = True


def redirect(location: str, status: int = 302) -> Callable[[BaseHTTPRequestHandler], None]:
    return lambda h: send(h, status, b"", headers={"Location": location})


def redirect_from_query(handler: BaseHTTPRequestHandler) -> None:
    """/to?url=...: a redirect to wherever the test says."""
    send(handler, 302, b"", headers={"Location": parse_qs(urlsplit(handler.path).query)[
        "url"][0]})


def hops(handler: BaseHTTPRequestHandler) -> None:
    """/hop?n=N: N more redirects (relative and absolute, alternating), then the image."""
    n = int(parse_qs(urlsplit(handler.path).query)["n"][0])
    if n == 0:
        send(handler, 200, IMAGE, headers={"Content-Type": "image/png"})
    elif n % 2:
        send(handler, 302, b"", headers={"Location": f"/hop?n={n - 1}"})
    else:
        host = handler.headers["host"]
        send(handler, 307, b"", headers={"Location": f"http://{host}/hop?n={n - 1}"})


@pytest.fixture
def server() -> Iterator[ImageServer]:
    srv = ImageServer()

    def dribble(handler):
        """Headers at once, then a byte every 50 ms for 20 s: each read is quick, so only
        the total time limit ends it."""
        handler.send_response(200)
        handler.send_header("Content-Length", "400")
        handler.end_headers()
        for _ in range(400):
            if srv.stop.wait(0.05):
                break
            try:
                handler.wfile.write(b"\x89")
                handler.wfile.flush()
            except OSError:
                break
        handler.close_connection = True

    def stall(handler):
        """Takes the request, answers nothing."""
        srv.stop.wait(20)
        handler.close_connection = True

    srv.routes.update({
        "/image.png": lambda h: send(h, 200, IMAGE, headers={"Content-Type": "image/png"}),
        "/other.png": lambda h: send(h, 200, OTHER_IMAGE),
        "/no-length.png": lambda h: send(h, 200, IMAGE, length=None),
        "/chunked.png": lambda h: chunked(h, IMAGE),
        "/big-declared": lambda h: send(h, 200, BIG),
        "/big-no-length": lambda h: send(h, 200, BIG, length=None),
        "/big-chunked": lambda h: chunked(h, BIG),
        # Lies: chunked with a small Content-Length; a Content-Length that stops short of
        # the bytes sent; one that promises more than is sent.
        "/big-chunked-lying": lambda h: chunked(h, BIG, lying_length=100),
        "/short-length": lambda h: send(h, 200, IMAGE + BIG, length=len(IMAGE)),
        "/long-length": lambda h: send(h, 200, IMAGE[:100], length=len(IMAGE)),
        "/text": lambda h: send(h, 200, b"this is plain text, not an image",
                                headers={"Content-Type": "text/plain"}),
        "/tiny.png": lambda h: send(h, 200, png(1, 1)),
        "/gone": lambda h: send(h, 410, b"gone"),
        "/dribble": dribble,
        "/stall": stall,
        "/to": redirect_from_query,
        "/hop": hops,
        "/redirect-no-location": lambda h: send(h, 302, b""),
    })
    # A short poll: shutdown() at teardown waits for it.
    thread = threading.Thread(target=srv.http.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.http.shutdown()
    srv.http.server_close()


def image_request(url: str, **fields) -> Image2ImageRequest:
    return Image2ImageRequest.model_validate({"prompt": "p", "imageUrl": url, **fields})


def fetched(url: str, cfg: AppConfig | None = None, **stubs) -> bytes | None:
    request = asyncio.run(fetch_input_image(image_request(url), cfg or config(), **stubs))
    assert request.imageUrl is None
    return request.image


def refused_with(error: type, url: str, cfg: AppConfig | None = None, **stubs):
    with pytest.raises(error) as info:
        fetched(url, cfg, **stubs)
    assert info.value.field == "imageUrl"
    return info.value


# --- the image arrives as sent ---------------------------------------------------------

@pytest.mark.parametrize("path", ["/image.png", "/no-length.png", "/chunked.png"])
def test_the_fetched_image_is_the_servers_bytes(server, path):
    """With a Content-Length, without one (the body ends with the connection), chunked."""
    assert fetched(server.url(path)) == IMAGE
    assert server.hits == [(path, f"127.0.0.1:{server.port}")]


def test_a_content_length_shorter_than_the_body_is_where_reading_stops(server):
    """The lie in one direction: nothing past the declared length is read, so the bytes
    held never exceed what was declared (itself within the limit)."""
    assert fetch(server.url("/short-length"), max_bytes=MAX_BYTES, timeout_s=5,
                 max_redirects=0, allow_private=True) == IMAGE
    assert fetched(server.url("/short-length")) == IMAGE


def test_a_content_length_longer_than_the_body_is_a_failed_fetch(server):
    error = refused_with(ImageUrlFailed, server.url("/long-length"))
    assert (error.status_code, error.code, error.message) == (
        422, "image_url_failed",
        f"imageUrl could not be fetched: the body ended after 100 of its {len(IMAGE)} bytes")


# --- size ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/big-declared", "/big-no-length", "/big-chunked",
                                  "/big-chunked-lying"])
def test_an_image_over_the_byte_limit_is_413_whatever_its_headers_say(server, path):
    """Refused by the declared Content-Length before reading, or counted while reading when
    there is none, or when it lies (chunked, with a small Content-Length beside it)."""
    error = refused_with(PayloadTooLarge, server.url(path))
    assert (error.status_code, error.code, error.message) == (
        413, "payload_too_large", f"the image at imageUrl is larger than {MAX_BYTES} bytes")


def test_the_limit_is_enforced_while_reading_not_after(server, monkeypatch):
    """outbound.fetch stops at the first read past the limit: what it held is at most the
    limit plus one read (64 KiB), far from the 192 KiB body."""
    import http.client

    from serve_app import outbound

    reads: list[int] = []
    original = http.client.HTTPResponse.read1

    def counting_read1(self, n=-1):
        data = original(self, n)
        reads.append(len(data))
        return data
    monkeypatch.setattr(http.client.HTTPResponse, "read1", counting_read1)
    with pytest.raises(outbound.FetchTooLarge):
        fetch(server.url("/big-no-length"), max_bytes=MAX_BYTES, timeout_s=5,
              max_redirects=0, allow_private=True)
    assert MAX_BYTES < sum(reads) <= MAX_BYTES + outbound.READ_CHUNK_BYTES
    assert sum(reads) < len(BIG)


# --- time ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/dribble", "/stall"])
def test_a_slow_server_meets_the_total_time_limit(server, path):
    """A byte every 50 ms (no single read times out) or no answer at all: both end at
    ingress.image_url.timeout_s, long before the server would have finished."""
    start = time.monotonic()
    error = refused_with(ImageUrlFailed, server.url(path), config(timeout_s=0.5))
    elapsed = time.monotonic() - start
    assert (error.status_code, error.code, error.message) == (
        422, "image_url_failed", "imageUrl did not give its image within 0.5 s")
    assert elapsed < 10  # the dribble lasts 20 s, the stall 20 s


# --- redirects -------------------------------------------------------------------------

def test_redirects_within_the_limit_are_followed_one_too_many_is_refused(server):
    assert fetched(server.url("/hop?n=3"), config(max_redirects=3)) == IMAGE
    assert [path for path, _ in server.hits] == ["/hop?n=3", "/hop?n=2", "/hop?n=1",
                                                 "/hop?n=0"]
    server.hits.clear()
    error = refused_with(ImageUrlRefused, server.url("/hop?n=4"), config(max_redirects=3))
    assert (error.status_code, error.code, error.message) == (
        422, "image_url_refused",
        "imageUrl cannot be fetched: it redirects more than 3 times (the most this service "
        "follows)")
    # The fourth redirect's target is never asked for.
    assert [path for path, _ in server.hits] == ["/hop?n=4", "/hop?n=3", "/hop?n=2",
                                                 "/hop?n=1"]
    server.hits.clear()
    refused_with(ImageUrlRefused, server.url("/hop?n=1"), config(max_redirects=0))
    assert [path for path, _ in server.hits] == ["/hop?n=1"]


def test_a_redirect_without_a_location_is_a_failed_fetch(server):
    error = refused_with(ImageUrlFailed, server.url("/redirect-no-location"))
    assert error.message == ("imageUrl could not be fetched: the server answered HTTP 302 "
                             "without a Location")


class LoopbackAsPublic:
    """A connector for a world where images.example.test is a public host: its public
    address is taken to the loopback image server; every other address is recorded and
    refused (nothing leaves the machine)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.addresses: list[tuple[str, int]] = []

    def __call__(self, address: tuple[str, int], timeout: float) -> socket.socket:
        self.addresses.append(address)
        if address[0] != PUBLIC_V4:
            raise ConnectionRefusedError("stub connector")
        return socket.create_connection(("127.0.0.1", self.port), timeout)


def public_world(port: int) -> dict:
    resolver = StubResolver({"images.example.test": [[PUBLIC_V4]],
                             "localhost": [["127.0.0.1"]],
                             "metadata.example.test": [["169.254.169.254"]],
                             "inside.example.test": [["10.0.0.5"]],
                             "mixed.example.test": [[PUBLIC_V4, "fd00::7"]]})
    return {"resolver": resolver, "connector": LoopbackAsPublic(port)}


@pytest.mark.parametrize("target,reason", [
    ("http://127.0.0.1:{port}/image.png", "127.0.0.1 is a loopback address"),
    ("http://localhost:{port}/image.png", "localhost resolves to a loopback address"),
    ("http://[::ffff:127.0.0.1]:{port}/image.png",
     "::ffff:127.0.0.1 is a loopback address (127.0.0.1 in IPv6 form)"),
    ("http://2130706433:{port}/image.png", "2130706433 is a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://metadata.example.test/latest/meta-data/",
     "metadata.example.test resolves to a link-local address"),
    ("http://100.100.100.200/latest/meta-data/",
     "100.100.100.200 is a carrier-grade NAT address"),
    ("http://inside.example.test/secret.png", "inside.example.test resolves to a private "
                                              "address"),
    ("http://mixed.example.test/x.png", "mixed.example.test resolves to a private address"),
])
def test_a_redirect_to_an_internal_address_is_refused_and_nothing_is_sent_there(
        server, target, reason):
    """The opt-in off: the client's URL names a (stub) public host, whose redirect points
    inside. The target is checked as the first URL was and refused before any connection;
    the answer says why without the address an internal name resolved to."""
    world = public_world(server.port)
    target = target.format(port=server.port)
    url = f"http://images.example.test:{server.port}/to?url={target}"
    error = refused_with(ImageUrlRefused, url, AppConfig(), **world)
    assert error.message.startswith(
        "imageUrl cannot be fetched: it redirects to a URL this service may not fetch: "
        f"{reason}")
    assert error.message.endswith("; this service calls public addresses only")
    for hidden in ("10.0.0.5", "fd00::7"):
        assert hidden not in error.message
    assert world["connector"].addresses == [(PUBLIC_V4, server.port)]
    assert [host for _, host in server.hits] == [f"images.example.test:{server.port}"]


def test_a_redirect_to_a_public_host_is_followed_the_control(server):
    """The control for the test above: the same world does reach the image, so refused
    there means refused, not unreachable."""
    world = public_world(server.port)
    target = f"http://images.example.test:{server.port}/image.png"
    assert fetched(f"http://images.example.test:{server.port}/to?url={target}", AppConfig(),
                   **world) == IMAGE
    assert world["connector"].addresses == [(PUBLIC_V4, server.port)] * 2


@pytest.mark.parametrize("target,reason", [
    ("file:///etc/passwd", "only http and https URLs can be called"),
    ("ftp://images.example.test/image.png", "only http and https URLs can be called"),
    ("http://other.example.test/image.png",
     "the host other.example.test is not one this service fetches from"),
])
def test_a_redirect_off_http_or_off_the_allowed_hosts_is_refused(server, target, reason):
    world = public_world(server.port)
    cfg = AppConfig.model_validate({"ingress": {"image_url": {
        "hosts": ["images.example.test"]}}})
    url = f"http://images.example.test:{server.port}/to?url={target}"
    error = refused_with(ImageUrlRefused, url, cfg, **world)
    assert error.message == ("imageUrl cannot be fetched: it redirects to a URL this "
                             f"service may not fetch: {reason}")
    assert world["connector"].addresses == [(PUBLIC_V4, server.port)]


# --- URLs refused before any connection -------------------------------------------------

@pytest.mark.parametrize("url,reason", [
    ("file:///etc/passwd", "only http and https URLs can be called"),
    ("ftp://127.0.0.1/image.png", "only http and https URLs can be called"),
    ("data:image/png;base64," + base64.b64encode(IMAGE).decode(),
     "only http and https URLs can be called"),
    ("gopher://127.0.0.1:70/_GET", "only http and https URLs can be called"),
    ("http:///image.png", "the URL has no host"),
    ("http://[::1/image.png", "the URL is malformed"),
    ("http://127.0.0.1:99999/image.png", "the URL's port is not a number from 1 to 65535"),
])
def test_urls_that_are_not_http_are_refused(url, reason):
    resolver, connector = StubResolver({}), LoopbackAsPublic(0)
    error = refused_with(ImageUrlRefused, url, config(), resolver=resolver,
                         connector=connector)
    assert error.message == f"imageUrl cannot be fetched: {reason}"
    assert (resolver.asked, connector.addresses) == ([], [])


@pytest.mark.parametrize("host,reason", [
    ("127.0.0.1", "127.0.0.1 is a loopback address"),
    ("169.254.169.254", "169.254.169.254 is a link-local address (cloud metadata services "
                        "live there)"),
    ("inside.example.test", "inside.example.test resolves to a private address"),
])
def test_internal_addresses_are_refused_by_default(server, host, reason):
    world = public_world(server.port)
    error = refused_with(ImageUrlRefused, f"http://{host}:{server.port}/image.png",
                         AppConfig(), **world)
    assert error.message == (f"imageUrl cannot be fetched: {reason}; this service calls "
                             "public addresses only")
    assert (world["connector"].addresses, server.hits) == ([], [])


def test_the_host_allow_list_applies_with_private_addresses_allowed(server):
    error = refused_with(ImageUrlRefused, server.url("/image.png"),
                         config(hosts=["images.example.test"]))
    assert error.message == ("imageUrl cannot be fetched: the host 127.0.0.1 is not one "
                             "this service fetches from")
    refused_with(ImageUrlRefused, server.url("/image.png"), config(hosts=[]))
    assert server.hits == []
    assert fetched(server.url("/image.png"), config(hosts=["127.0.0.1"])) == IMAGE


def test_host_allow_lists_are_checked_as_callback_hosts_are():
    with pytest.raises(ValidationError, match="ingress.image_url.hosts: 'https://x.example' "
                                              "is not a host name"):
        config(hosts=["https://x.example"])
    with pytest.raises(ValidationError, match="max_redirects"):
        config(max_redirects=11)
    assert AppConfig().ingress.image_url.model_dump() == {
        "timeout_s": 10.0, "max_redirects": 3, "hosts": None, "allow_private": False}


# --- what comes back is checked as an upload ------------------------------------------

@pytest.mark.parametrize("path,error,status,code,message", [
    ("/text", InvalidImage, 422, "invalid_image", "image must be a PNG or JPEG file"),
    ("/tiny.png", InvalidImage, 422, "invalid_image",
     "image is 1x1; each side must be at least 64 pixels"),
    ("/gone", ImageUrlFailed, 422, "image_url_failed",
     "imageUrl could not be fetched: the server answered HTTP 410"),
    ("/nothing-here", ImageUrlFailed, 422, "image_url_failed",
     "imageUrl could not be fetched: the server answered HTTP 404"),
])
def test_what_is_not_an_image_gets_the_image_errors(server, path, error, status, code,
                                                    message):
    caught = refused_with(error, server.url(path))
    assert (caught.status_code, caught.code, caught.message) == (status, code, message)


def test_a_closed_port_is_a_refused_connection():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = refused_with(ImageUrlFailed, f"http://127.0.0.1:{port}/image.png")
    assert error.message == "imageUrl could not be fetched: the connection was refused"


# --- the request: one of image and imageUrl ---------------------------------------------

def read(body: dict, model=Image2ImageRequest, cfg: AppConfig | None = None):
    return asyncio.run(read_request(http_request(json.dumps(body).encode()), model,
                                    cfg or config()))


def test_exactly_one_of_image_and_image_url(server):
    both = {"prompt": "p", "image": base64.b64encode(IMAGE).decode(),
            "imageUrl": server.url("/image.png")}
    with pytest.raises(InvalidRequest) as info:
        read(both)
    assert (info.value.status_code, info.value.code, info.value.field, info.value.message) == (
        422, "invalid_request", "imageUrl",
        "send the input image as image or as imageUrl, not both")
    with pytest.raises(InvalidImage) as info:
        read({"prompt": "p"})
    assert (info.value.status_code, info.value.field, info.value.message) == (
        422, "image", "an input image is required: image (or imageUrl)")
    assert server.hits == []  # neither request fetched anything
    with pytest.raises(InvalidRequest) as info:
        read({"prompt": "p", "imageUrl": "http://h/" + "x" * 8192})
    assert info.value.field == "imageUrl"


def test_a_request_invalid_otherwise_fetches_nothing(server):
    with pytest.raises(InvalidRequest) as info:
        read({"prompt": "p", "imageUrl": server.url("/image.png"), "step": 1,
              "strength": 0.5})
    assert info.value.field == "strength"
    with pytest.raises(InvalidRequest) as info:
        read({"prompt": "p", "imageUrl": server.url("/image.png"), "size": "640x640"})
    assert info.value.field == "size"
    assert server.hits == []


def test_a_multipart_form_may_name_an_image_url(server):
    raw = (b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n"
           b"--b\r\nContent-Disposition: form-data; name=\"imageUrl\"\r\n\r\n"
           + server.url("/image.png").encode() + b"\r\n--b--\r\n")
    request = asyncio.run(read_request(http_request(raw, "multipart/form-data; boundary=b"),
                                       Image2ImageRequest, config()))
    assert (request.prompt, request.image, request.imageUrl) == ("a cat", IMAGE, None)


def test_openai_edits_take_an_uploaded_image_only(server):
    """OpenAI's images.edit sends the image as a file; an imageUrl field is unknown there."""
    raw = (b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n"
           b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\n"
           b"Content-Type: image/png\r\n\r\n" + IMAGE + b"\r\n"
           b"--b\r\nContent-Disposition: form-data; name=\"imageUrl\"\r\n\r\n"
           + server.url("/image.png").encode() + b"\r\n--b--\r\n")
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(read_request(http_request(raw, "multipart/form-data; boundary=b"),
                                 OpenAIEditRequest, config()))
    assert (info.value.field, info.value.message) == ("imageUrl",
                                                      "Extra inputs are not permitted")
    assert server.hits == []


# --- through the service: the same output as the bytes inline ---------------------------

class FakeGeneratorBatcher:
    """A batcher handle over serve_app.testing.FakeGenerator in this process, its input
    images decoded as the model replica decodes them: the output depends on the input's
    pixels."""

    def __init__(self, cfg: AppConfig) -> None:
        self.limits = cfg.limits
        self.generator = FakeGenerator()
        self.calls: list[GenerationItem] = []
        self.generate = self

    def remote(self, call: GenerationItem):
        self.calls.append(call)

        async def answer() -> ModelResult:
            init = None
            if call.init_image is not None:
                init = [decode_input_image(call.init_image, call.width, call.height,
                                           self.limits)]
            [images] = self.generator.generate([call], init_images=init)
            return ModelResult(images=images, pipeline_s=0.0, batch_size=1)
        return answer()


def test_an_image_url_gives_the_same_bytes_as_the_image_inline(server):
    cfg = config(hosts=["127.0.0.1"])
    store = ImageStore(f"memory://{uuid.uuid4().hex}/s")
    batcher = FakeGeneratorBatcher(cfg)
    generation = GenerationService(batcher, store, cfg)
    services = IngressServices(config=cfg, api_keys=None, store=store, generation=generation,
                               jobs=None, openai=None, readiness=None)  # type: ignore[arg-type]
    client = TestClient(build_http_app(services))

    def output(**image) -> bytes:
        answer = client.post("/api/image2image", json={"prompt": "p", "seed": 5, "step": 2,
                                                       "strength": 0.5, **image})
        assert answer.status_code == 200, answer.text
        url = answer.json()["output"][0]["url"].removeprefix("http://testserver")
        return client.get(url).content

    inline = output(image=base64.b64encode(IMAGE).decode())
    by_url = output(imageUrl=server.url("/image.png"))
    other = output(imageUrl=server.url("/other.png"))
    assert inline[:8] == b"\x89PNG\r\n\x1a\n"
    assert by_url == inline
    assert other != inline  # the input matters: equal bytes above are not a coincidence
    assert [call.init_image for call in batcher.calls] == [IMAGE, IMAGE, OTHER_IMAGE]
    # The route's errors: JSON, the field named, before anything streams.
    for path in ("/api/image2image", "/api/image2image/stream"):
        answer = client.post(path, json={"prompt": "p", "imageUrl": "file:///etc/passwd"})
        assert (answer.status_code, answer.json()["error"]) == (422, {
            "code": "image_url_refused", "field": "imageUrl",
            "message": "imageUrl cannot be fetched: only http and https URLs can be called"})


def test_a_job_carries_the_fetched_bytes_and_its_run_fetches_nothing(server):
    """Fetched at submission, like an upload: the record holds the image, not the URL, so
    a run (on any consumer, at any time) needs no fetch and sees exactly these bytes."""
    cfg = config()
    store = ImageStore(f"memory://{uuid.uuid4().hex}/s")
    queue = ListQueue()
    jobs = JobService(store, cfg, queue, DictKeys())
    body = read({"prompt": "p", "imageUrl": server.url("/image.png"), "seed": 3},
                (JobRequest, Image2ImageJobRequest), cfg)
    assert type(body) is Image2ImageJobRequest
    record, created = asyncio.run(jobs.submit(body, None, "http://h"))
    assert created
    assert (record.request["image"], record.request["imageUrl"]) == (
        base64.b64encode(IMAGE).decode(), None)
    assert request_model(record.request) is Image2ImageRequest
    seen: list[bytes | None] = []

    async def generate(request, request_id, seed, base_url, on_call_done=None, **kwargs):
        seen.append(request.image)
        on_call_done(1)
        return {"id": request_id, "output": []}

    runner = JobRunner(store, cfg, generate)
    assert asyncio.run(runner.run(*queue.jobs[0])) == "succeeded"
    assert seen == [IMAGE]
    assert len(server.hits) == 1
