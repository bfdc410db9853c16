"""What the metrics server answers: the pages (landing page, metrics,
routes such as the daemon's probes), basic auth checked against bcrypt
hashes, the rate limit and compression. Pure request -> reply logic, run in
the server's scrape workers (server.py)."""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import hmac
import html
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .config import RateLimitSettings

logger = logging.getLogger(__name__)

# A route answers with (HTTP status, Content-Type, body).
RouteHandler = Callable[[], tuple[int, str, bytes]]

# bcrypt only ever looks at the first 72 bytes of a password. bcrypt >= 5
# raises on longer ones, but htpasswd and Go (exporter-toolkit) truncate, so
# truncating here keeps accepting the same passwords they do.
_BCRYPT_MAX_PASSWORD_BYTES = 72
# As in exporter-toolkit: remember a bounded number of verified credentials
# so that each scrape does not pay for a deliberately slow bcrypt check.
_VERIFIED_CREDENTIALS_CACHE_SIZE = 100

# Level 6 (zlib's default, as Go uses) is several times faster than
# gzip.compress's default 9 and compresses metrics text nearly as well.
_GZIP_LEVEL = 6

_ALLOWED_METHODS = "GET, HEAD"


class BasicAuthVerifier:
    """Checks ``Authorization: Basic`` against bcrypt hashes, as exporter-toolkit does."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = [
            (username.encode(), password_hash) for username, password_hash in users.items()
        ]
        # For an unknown user, check the password against a real hash anyway
        # (and then refuse), so that the answer takes as long as for a known
        # user and the timing does not tell which user names exist.
        self._decoy_hash = self._users[0][1]
        # bcrypt is CPU-heavy by design: one check at a time, as in
        # exporter-toolkit, so a flood of bad passwords cannot take every core.
        self._bcrypt_lock = threading.Lock()
        # Digests of credentials that passed, most recently used last. Only
        # successes are kept: failures cannot push good entries out.
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._verified_lock = threading.Lock()

    def is_authorized(self, authorization: str | None) -> bool:
        credentials = _parse_basic_authorization(authorization)
        if credentials is None:
            return False
        username, password = credentials
        stored_hash = None
        # compare_digest over every user, not a dict lookup, keeps the time
        # independent of which user names exist.
        for known_username, known_hash in self._users:
            if hmac.compare_digest(known_username, username):
                stored_hash = known_hash
        cache_key = _credentials_digest(username, password, stored_hash or b"")
        if stored_hash is not None:
            with self._verified_lock:
                if cache_key in self._verified:
                    self._verified.move_to_end(cache_key)
                    return True
        with self._bcrypt_lock:
            try:
                password_matches = bcrypt.checkpw(
                    password[:_BCRYPT_MAX_PASSWORD_BYTES], stored_hash or self._decoy_hash
                )
            except ValueError:
                password_matches = False
        if stored_hash is None or not password_matches:
            return False
        with self._verified_lock:
            self._verified[cache_key] = None
            while len(self._verified) > _VERIFIED_CREDENTIALS_CACHE_SIZE:
                self._verified.popitem(last=False)
        return True


def _credentials_digest(username: bytes, password: bytes, password_hash: bytes) -> bytes:
    # A digest, not the password itself, is what stays in memory. Lengths go
    # in first so that no two different triples hash the same bytes.
    digest = hashlib.sha256()
    for part in (username, password_hash, password):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


def _parse_basic_authorization(authorization: str | None) -> tuple[bytes, bytes] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return username, password


class TokenBucket:
    """``rate_limit``: ``burst`` requests at once, then one per ``interval``."""

    def __init__(self, settings: RateLimitSettings) -> None:
        self._tokens_per_second = 1.0 / settings.interval_seconds
        self._capacity = float(settings.burst)
        self._tokens = self._capacity
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            elapsed = now - self._updated
            self._tokens = min(self._capacity, self._tokens + elapsed * self._tokens_per_second)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


def _gzip_accepted(accept_encoding: str | None) -> bool:
    for coding in (accept_encoding or "").split(","):
        name, *parameters = coding.split(";")
        if name.strip().lower() not in ("gzip", "x-gzip"):
            continue
        for parameter in parameters:
            key, _, quality = parameter.partition("=")
            if key.strip().lower() == "q" and _is_zero(quality):
                return False  # "gzip;q=0" means "anything but gzip"
        return True
    return False


def _is_zero(text: str) -> bool:
    try:
        return float(text) == 0
    except ValueError:
        return False


@dataclass
class Site:
    """What the scrape workers serve; shared, read-only per request."""

    registry: CollectorRegistry
    telemetry_path: str
    landing_page: bytes
    routes: Mapping[str, RouteHandler]
    headers: Mapping[str, str]
    basic_auth: BasicAuthVerifier | None
    rate_limiter: TokenBucket | None
    # False while the metrics are not worth scraping yet (the daemon has not
    # started tracing): the telemetry path answers 503 until then.
    ready: Callable[[], bool] = lambda: True


@dataclass
class Request:
    """A parsed request head, as the page logic needs it."""

    method: str
    target: str
    headers: Mapping[str, str]  # lower-case names; the first of repeated ones
    client: str


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    send_body: bool = True
    headers: list[tuple[str, str]] = field(default_factory=list)


# The standard methods nothing here serves get 405; methods nobody defines
# (FOO) get 501, the status HTTP asks for an unrecognised method.
_KNOWN_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})


def text_reply(
    status: int, text: str, send_body: bool, headers: Iterable[tuple[str, str]] = ()
) -> Reply:
    return Reply(
        status,
        "text/plain; charset=utf-8",
        f"{text}\n".encode(),
        send_body,
        [("X-Content-Type-Options", "nosniff"), *headers],
    )


def answer(site: Site, request: Request) -> Reply:
    """The page for one request: runs in a scrape worker (it may collect metrics or bcrypt)."""
    send_body = request.method != "HEAD"
    if request.method not in ("GET", "HEAD") and request.method not in _KNOWN_METHODS:
        return text_reply(501, "Not Implemented", True)
    if site.rate_limiter is not None and not site.rate_limiter.allow():
        return text_reply(429, "Too Many Requests", send_body)
    if site.basic_auth is not None and not site.basic_auth.is_authorized(
        request.headers.get("authorization")
    ):
        return text_reply(401, "Unauthorized", send_body, [("WWW-Authenticate", "Basic")])
    if request.method not in ("GET", "HEAD"):
        return text_reply(405, "Method Not Allowed", send_body, [("Allow", _ALLOWED_METHODS)])
    url = urlsplit(request.target)
    if url.path == site.telemetry_path:
        if not site.ready():
            return text_reply(503, "Service Unavailable: tracing has not started yet", send_body)
        return _metrics_reply(site, request, url.query, send_body)
    if url.path == "/":
        return Reply(200, "text/html; charset=utf-8", site.landing_page, send_body)
    route = site.routes.get(url.path)
    if route is None:
        return text_reply(404, "Not Found", send_body)
    try:
        status, content_type, body = route()
    except Exception:
        logger.exception("handling %s for %s failed", url.path, request.client)
        return text_reply(500, "Internal Server Error", send_body)
    return Reply(status, content_type, body, send_body)


def _metrics_reply(site: Site, request: Request, query: str, send_body: bool) -> Reply:
    try:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        registry: Any = site.registry
        selected_names = parse_qs(query).get("name[]")
        if selected_names:
            # Like prometheus_client's own handler: ?name[]=x&name[]=y
            registry = registry.restricted_registry(selected_names)
        body = encoder(registry)
    except Exception:
        logger.exception("collecting metrics for %s failed", request.client)
        return text_reply(500, "Internal Server Error: collecting metrics failed", send_body)
    headers = [("Vary", "Accept-Encoding")]
    if _gzip_accepted(request.headers.get("accept-encoding")):
        body = gzip.compress(body, compresslevel=_GZIP_LEVEL)
        headers.append(("Content-Encoding", "gzip"))
    return Reply(200, content_type, body, send_body, headers)


def landing_page(title: str, links: Iterable[str]) -> bytes:
    title_html = html.escape(title)
    items = "".join(
        f'<li><a href="{html.escape(path, quote=True)}">{html.escape(path)}</a></li>'
        for path in links
    )
    return (
        "<!DOCTYPE html>\n"
        '<html><head><meta charset="utf-8">'
        f"<title>{title_html}</title></head>\n"
        f"<body><h1>{title_html}</h1><ul>{items}</ul></body></html>\n"
    ).encode()
