"""Confidential mode's checks of the data that leaves the TEE: the job broker (prompts in
job payloads, over the network) and the image store (job records with their prompts, and
the images, at rest and in transit).

security.require_tee refuses to start unless
- every Redis URL the jobs use (broker, keys) is `rediss://` with certificate verification:
  `?ssl_cert_reqs=required` (kombu, Celery and redis-py read it from the URL; without it
  kombu connects with CERT_NONE), and no `ssl_check_hostname=false`;
- the store is an S3-compatible bucket (OSS through its S3 API) over https, with server-side
  encryption asked for on every write: storage_options.s3_additional_kwargs
  {"ServerSideEncryption": "KMS"} (OSS; "aws:kms" on AWS S3; or "AES256": keys the store
  manages). Server-side, not client-side, encryption: the ingress serves image URLs from
  the bucket and every replica reads job records, so client-side encryption would need a
  key shared by every pod and rotated by this service; with SSE the keys stay in KMS and
  the bucket refuses nothing a reader with credentials may read (see README, Security).
Each can be waived by name in security.accept_risks. The checks run where the URLs are
known (a URL from an environment variable only inside the replicas), and fail start-up
with one line that names the setting, never the URL (it may hold a password).
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from serve_app.config import AppConfig

logger = logging.getLogger("ray.serve")

BROKER_RISK = "broker_without_tls"
STORE_RISK = "store_without_encryption"
# OSS's S3-compatible API takes KMS (its KMS, default or SSEKMSKeyId key) and AES256 (keys
# OSS manages); AWS S3 calls the first aws:kms.
SSE_MODES = ("KMS", "aws:kms", "AES256")
URL_FORM = "rediss://:PASSWORD@HOST:PORT/0?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem"

BrokerTls = Literal["verified", "unverified", "none"]


class ConfidentialModeError(RuntimeError):
    """Confidential mode cannot hold with this configuration: the replica refuses to start."""


def redis_tls(url: str) -> BrokerTls:
    """'verified': rediss:// that checks the server's certificate and host name;
    'unverified': TLS without those checks; 'none': clear text."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return "none"
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    # "required" exactly: kombu also reads CERT_REQUIRED, redis-py (the keys) does not.
    if query.get("ssl_cert_reqs") != "required":
        return "unverified"
    if query.get("ssl_check_hostname", "true").lower() == "false":
        return "unverified"
    return "verified"


def store_encryption(config: AppConfig) -> str:
    """The server-side encryption every write to the store asks for, or 'none' (a local
    directory; a bucket without it)."""
    url = config.store.url or ""
    if urlsplit(url).scheme not in ("s3", "s3a"):
        return "none"
    extra = config.store.storage_options.get("s3_additional_kwargs") or {}
    mode = extra.get("ServerSideEncryption") if isinstance(extra, dict) else None
    return mode if mode in SSE_MODES else "none"


def store_tls(config: AppConfig) -> bool:
    """The store is reached over https (s3fs's default endpoint is; a set endpoint_url must
    say https). A local directory is not reached over a network at all: False."""
    if urlsplit(config.store.url or "").scheme not in ("s3", "s3a"):
        return False
    options = config.store.storage_options
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
        "endpoint_url")
    return endpoint is None or str(endpoint).lower().startswith("https://")


def protections(config: AppConfig, broker: str | None = None,
                keys: str | None = None) -> dict[str, Any]:
    """What /readyz shows. `broker`/`keys`: the resolved URLs (None: not known here)."""
    urls = [u for u in (broker, keys) if u is not None]
    tls: list[BrokerTls] = [redis_tls(u) for u in urls]
    order: list[BrokerTls] = ["none", "unverified", "verified"]
    return {
        "confidential": config.security.require_tee,
        # The weakest of the Redis connections the jobs use.
        "brokerTls": min(tls, key=order.index) if tls else None,
        "storeEncryption": store_encryption(config),
        "storeTls": store_tls(config),
        "acceptedRisks": list(config.security.accept_risks),
    }


def _broker_problem(url: str, where: str) -> str | None:
    if urlsplit(url).scheme.startswith("amqp"):
        return (f"{where} is RabbitMQ; confidential mode supports a Redis broker over "
                f"rediss:// only")
    tls = redis_tls(url)
    if tls == "none":
        return f"{where} is not rediss:// (prompts would cross the network in clear)"
    if tls == "unverified":
        return (f"{where} is rediss:// without certificate verification (needs "
                "ssl_cert_reqs=required, and no ssl_check_hostname=false)")
    return None


def _store_problem(config: AppConfig) -> str | None:
    if urlsplit(config.store.url or "").scheme not in ("s3", "s3a"):
        return "store.url is not an s3:// bucket (a local directory is not encrypted at rest)"
    if store_encryption(config) == "none":
        return ("store.storage_options.s3_additional_kwargs has no ServerSideEncryption "
                "(KMS, aws:kms or AES256)")
    if not store_tls(config):
        return "store.storage_options.endpoint_url is not https://"
    return None


def check(config: AppConfig, broker: str | None = None, broker_source: str = "",
          keys: str | None = None, keys_source: str = "") -> None:
    """Raise ConfidentialModeError (one line) when confidential mode is on and a protection
    is missing and not waived in security.accept_risks. `broker`/`keys` None: not checked
    here (their URL is only known inside the replicas)."""
    security = config.security
    if not security.require_tee:
        return
    problems = []
    if BROKER_RISK not in security.accept_risks:
        for url, source in ((broker, broker_source), (keys, keys_source)):
            problem = _broker_problem(url, source) if url is not None else None
            if problem and problem not in problems:
                problems.append(problem)
        if problems:
            problems[-1] += f"; use {URL_FORM}, or accept the risk: security.accept_risks " \
                            f"[{BROKER_RISK}]"
    if STORE_RISK not in security.accept_risks:
        problem = _store_problem(config)
        if problem:
            problems.append(f"{problem}; or accept the risk: security.accept_risks "
                            f"[{STORE_RISK}]")
    if problems:
        raise ConfidentialModeError("confidential mode (security.require_tee) refuses to "
                                    "start: " + "; ".join(problems))


class UntrustedCertificate(RuntimeError):
    """A rediss:// server's certificate fails verification: it never will, so start-up
    stops with this rather than every job submission failing later."""


def check_certificate(url: str, source: str, timeout_s: float = 5.0) -> None:
    """A TLS handshake with a verifying rediss:// URL's server, as redis-py makes it
    (ssl_ca_certs, host name check). Raises UntrustedCertificate when verification fails;
    a server that cannot be reached now is only logged (it may come up later: the broker
    clients retry)."""
    if redis_tls(url) != "verified":
        return
    parts = urlsplit(url)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    ca = query.get("ssl_ca_certs")
    context = ssl.create_default_context(cafile=unquote(ca) if ca else None)
    host, port = parts.hostname or "localhost", parts.port or 6379
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock, \
                context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as err:
        raise UntrustedCertificate(
            f"{source}: the Redis server's TLS certificate is not trusted "
            f"({err.verify_message}; ssl_ca_certs must name the CA that signed it): "
            "refusing to start") from None
    except (OSError, ssl.SSLError) as err:
        logger.warning("%s: TLS check at start-up could not reach the server (%s); "
                       "going on", source, type(err).__name__)


def check_certificates(urls: dict[str, Any]) -> None:
    """check_certificate for the broker and keys URLs of jobs.broker.confidential_urls."""
    for name in ("broker", "keys"):
        if urls.get(name):
            check_certificate(urls[name], urls[f"{name}_source"])
