"""A strict S3-compatible endpoint on loopback, for tests: HTTPS with a self-signed
certificate the test makes, refusing what Alibaba OSS's S3-compatible endpoint refuses,
and otherwise moto's S3 (its WSGI app, in this process).

moto accepts everything botocore 1.36+ sends by default; OSS does not:
* `Content-Encoding: aws-chunked` bodies (`x-amz-content-sha256: STREAMING-...`, a checksum
  in an `x-amz-trailer`): botocore sends PutObject that way over HTTPS unless checksums are
  calculated only when required;
* DeleteObjects (`POST ?delete`) without `Content-MD5`: OSS requires it, and botocore 1.36+
  sends a CRC32 checksum instead.
Each refusal is an S3 error document with HTTP 400, as a server's refusal reaches botocore.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from werkzeug.serving import WSGIRequestHandler, make_server

HOST = "127.0.0.1"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (also the CA the client trusts)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3-strict test endpoint")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "s3-strict.crt", directory / "s3-strict.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


def refusal(environ: dict[str, Any], body: bytes) -> str | None:
    """Why OSS would refuse this request, or None."""
    encoding = environ.get("HTTP_CONTENT_ENCODING", "").lower()
    if "aws-chunked" in encoding:
        return "aws-chunked encoding is not supported"
    if environ.get("HTTP_X_AMZ_CONTENT_SHA256", "").upper().startswith("STREAMING-"):
        return "streaming payload signatures are not supported"
    if environ.get("HTTP_X_AMZ_TRAILER"):
        return "trailing checksums are not supported"
    query = environ.get("QUERY_STRING", "")
    if environ["REQUEST_METHOD"] == "POST" and "delete" in {
            part.split("=", 1)[0] for part in query.split("&")}:
        md5 = environ.get("HTTP_CONTENT_MD5")
        if md5 is None:
            return "Missing required header for this request: Content-MD5"
        if md5 != base64.b64encode(hashlib.md5(body).digest()).decode():
            return "The Content-MD5 you specified was invalid"
    return None


@dataclass
class StrictS3:
    endpoint: str
    ca_file: Path
    # (method, path, why) of every refused request, for the test's own assertions.
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)


def _strict_app(backend: Callable[..., Iterable[bytes]], standin: StrictS3) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        import io

        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        path = environ.get("PATH_INFO", "")
        standin.seen.append((environ["REQUEST_METHOD"], path))
        why = refusal(environ, body)
        if why is None:
            return backend(environ, start_response)
        standin.refused.append((environ["REQUEST_METHOD"], path, why))
        document = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidArgument'
                    f"</Code><Message>{why}</Message></Error>").encode()
        start_response("400 Bad Request", [("Content-Type", "application/xml"),
                                           ("Content-Length", str(len(document)))])
        return [document]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass  # the refusals are recorded in StrictS3.refused


@contextmanager
def strict_s3(directory: Path) -> Iterator[StrictS3]:
    """Serve the strict endpoint on a free loopback port until the block ends."""
    from moto.server import DomainDispatcherApplication, create_backend_app

    cert, key = make_certificate(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    standin = StrictS3(endpoint="", ca_file=cert)
    backend = DomainDispatcherApplication(create_backend_app)
    server = make_server(HOST, 0, _strict_app(backend, standin), threaded=True,
                         request_handler=_QuietHandler, ssl_context=context)
    standin.endpoint = f"https://{HOST}:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield standin
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
