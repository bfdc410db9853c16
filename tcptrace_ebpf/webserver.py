"""The exporter's HTTP(S) server and its web config file.

The web config file is the one every Prometheus exporter built on
exporter-toolkit reads with ``--web.config.file``
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md),
so an existing file for node_exporter works here too. Where Python's ``ssl``
module cannot do what the file asks, loading fails with a one-line
``UserError`` instead of quietly serving something weaker or different.

Differences from exporter-toolkit, on purpose:

* The file is read and checked once, at startup (exporter-toolkit re-reads it
  on every request and every TLS handshake). Restart to pick up a new
  certificate or password.
* ``client_auth_type`` ``RequestClientCert`` and ``RequireAnyClientCert`` ask
  for a client certificate without verifying it; Python's ``ssl`` cannot do
  that, so they are rejected. The verifying types need a client CA
  (exporter-toolkit would fall back to the system roots, which lets in any
  certificate a public CA ever issued).
* ``curve_preferences`` may name one curve only (all Python 3.11 can set is
  ``ssl.SSLContext.set_ecdh_curve``), and not X25519 where that cannot.
* ``http2`` is accepted but the server speaks HTTP/1.1 only (see
  ``_parse_http_server_config``).
* A ``tls_server_config`` with settings but no certificate is an error, not
  plain HTTP; a ``rate_limit`` with ``burst`` 0 is an error, not a server that
  answers every request with 429.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import difflib
import errno
import gzip
import hashlib
import hmac
import html
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from email.utils import formatdate
from types import MappingProxyType
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import bcrypt
import h11
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from tcptrace_ebpf.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "MetricsServer",
    "RateLimitSettings",
    "RouteHandler",
    "TLSServerSettings",
    "WebConfig",
    "load_web_config",
    "parse_listen_address",
]

# A route answers with (HTTP status, Content-Type, body).
RouteHandler = Callable[[], tuple[int, str, bytes]]

LISTEN_ADDRESS_OPTION = "--web.listen-address"
TELEMETRY_PATH_OPTION = "--web.telemetry-path"
_LISTEN_ADDRESS_EXAMPLE = "0.0.0.0:9100"

# A client that connects and never finishes its TLS handshake holds its
# connection for at most this long.
TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0
# The whole request head (request line and headers) must arrive within this
# long: from the connection's start (after TLS) for its first request, from
# the first byte for the next ones on a kept-alive connection.
REQUEST_HEAD_TIMEOUT_SECONDS = 10.0
# A request head larger than this is refused (431), as Go's 1 MB default
# would be by far more than any scraper sends.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
# A client that does not read its answer holds its connection this long.
WRITE_TIMEOUT_SECONDS = 30.0
# Open connections at most (README): past it, the connection that has
# waited longest without a whole request is closed for the new one. Each
# costs a socket and a few kB, never a thread.
MAX_CONNECTIONS = 512
# Threads that build answers (collect metrics, bcrypt, routes), started
# with the server; with the event loop's thread, all the server ever runs.
SCRAPE_WORKERS = 4
# Longest wait for the next read on a connection, which is also how long an
# idle keep-alive connection stays open. Longer than the usual scrape
# intervals (15 s to 1 min) so that Prometheus can reuse its connection (and
# skip a TLS handshake) instead of racing the server closing it.
CONNECTION_IDLE_TIMEOUT_SECONDS = 90.0

# bcrypt only ever looks at the first 72 bytes of a password. bcrypt >= 5
# raises on longer ones, but htpasswd and Go (exporter-toolkit) truncate, so
# truncating here keeps accepting the same passwords they do.
_BCRYPT_MAX_PASSWORD_BYTES = 72
# As in exporter-toolkit: remember a bounded number of verified credentials
# so that each scrape does not pay for a deliberately slow bcrypt check.
_VERIFIED_CREDENTIALS_CACHE_SIZE = 100
# Matches what the bcrypt package can check: $2a$, $2b$, $2x$ or $2y$, a
# two-digit cost, then 22 characters of salt and 31 of hash.
_BCRYPT_HASH_RE = re.compile(r"\$2[abxy]\$(?P<cost>[0-9]{2})\$[./A-Za-z0-9]{53}")
_HTPASSWD_HINT = "generate one with: htpasswd -nBC 10 '' | tr -d ':\\n'"

# Level 6 (zlib's default, as Go uses) is several times faster than
# gzip.compress's default 9 and compresses metrics text nearly as well.
_GZIP_LEVEL = 6

_ALLOWED_METHODS = "GET, HEAD"

# ---------------------------------------------------------------------------
# --web.listen-address
# ---------------------------------------------------------------------------

_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
_DOTTED_NUMBERS_RE = re.compile(r"[0-9.]+")


def parse_listen_address(value: str, option_name: str = LISTEN_ADDRESS_OPTION) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``:PORT`` or ``[IPV6]:PORT`` into ``(host, port)``.

    An empty host (``:PORT``) means every interface, IPv4 and IPv6. IPv6 hosts
    come back without their brackets.
    """

    def invalid(problem: str) -> NoReturn:
        raise UserError(f"invalid {option_name} {value!r}: {problem}")

    expected = f"expected HOST:PORT, [IPV6]:PORT or :PORT, e.g. {_LISTEN_ADDRESS_EXAMPLE}"
    if value.startswith("["):
        bracket_end = value.find("]:")
        if bracket_end < 0:
            invalid(expected)
        host, port_text = value[1:bracket_end], value[bracket_end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            invalid(f"{host!r} in brackets is not an IPv6 address; {expected}")
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            invalid(expected)
        if ":" in host:
            invalid(f"put an IPv6 address in brackets, e.g. [::1]:{port_text or 'PORT'}")
        if host and not _is_ipv4_or_hostname(host):
            invalid(f"{host!r} is not an IPv4 address or host name; {expected}")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        invalid(f"the port must be a number from 0 to 65535; {expected}")
    return host, int(port_text)


def _is_ipv4_or_hostname(host: str) -> bool:
    if _DOTTED_NUMBERS_RE.fullmatch(host):
        # Digits and dots only: an IPv4 address or a typo, never a host name.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOSTNAME_RE.fullmatch(host))


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------
# Web config file
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSServerSettings:
    """``tls_server_config`` as loaded; the usable form is ``WebConfig.ssl_context``."""

    cert_source: str  # the cert_file path, or "inline cert"
    key_source: str  # the key_file path, or "inline key"
    client_auth_type: str
    client_ca_source: str | None
    min_version: str
    max_version: str
    cipher_suites: tuple[str, ...]
    curve_preferences: tuple[str, ...]
    prefer_server_cipher_suites: bool
    # Normalised (IP addresses in canonical form) so they compare with what
    # the client certificate says.
    client_allowed_sans: frozenset[str]


@dataclass(frozen=True)
class RateLimitSettings:
    """``rate_limit``: a token bucket refilled every ``interval_seconds``."""

    interval_seconds: float
    burst: int


@dataclass(frozen=True)
class WebConfig:
    """A checked web config file, ready to serve with."""

    path: str
    tls: TLSServerSettings | None
    ssl_context: ssl.SSLContext | None = field(repr=False, compare=False)
    headers: Mapping[str, str]
    # Accepted for compatibility only; see _parse_http_server_config.
    http2: bool
    # username -> bcrypt hash
    basic_auth_users: Mapping[str, bytes] = field(repr=False)
    rate_limit: RateLimitSettings | None


_TOP_LEVEL_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)
_HTTP_KEYS = ("http2", "headers")
_RATE_LIMIT_KEYS = ("interval", "burst")

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Python's ssl has no "ask for a certificate but do not verify it", which
# RequestClientCert and RequireAnyClientCert (and its old name
# RequireClientCert) mean.
_CLIENT_AUTH_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

# Go's names (those crypto/tls.CipherSuites() lists, which exporter-toolkit
# accepts) for TLS 1.0-1.2 suites, with their OpenSSL names.
_TLS12_CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# TLS 1.3 suites are accepted and change nothing, exactly as in Go, where
# they cannot be configured either: OpenSSL keeps offering its (all secure)
# TLS 1.3 suites.
_TLS13_CIPHER_SUITES = frozenset(
    {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
)

# Go's curve names (exporter-toolkit's list) with their OpenSSL names.
_CURVES = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}

# exporter-toolkit lets only these response headers be set, some only to
# fixed values; anything else is an error there, and so here.
_CONFIGURABLE_HEADERS: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

_GO_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # MICRO SIGN
    "μs": 1e-6,  # GREEK SMALL LETTER MU
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

_PEM_CERTIFICATE_MARKER = b"-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY_RE = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


def load_web_config(path: str | None) -> WebConfig | None:
    """Read and check a web config file; ``None`` when no file was given.

    Everything is checked here, certificates loaded and the TLS context built,
    so that a bad file stops the program at startup, never at a scrape.
    """
    if path is None:
        return None
    config_file = _ConfigFile(path)
    try:
        with open(path, "rb") as stream:
            content = stream.read()
    except OSError as err:
        config_file.fail(f"cannot read the file: {_os_error_text(err)}")
    try:
        document = yaml.load(content, Loader=_StrictYAMLLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as err:
        config_file.fail(_yaml_error_text(err))
    except yaml.YAMLError as err:
        config_file.fail(f"invalid YAML: {err}")

    top = config_file.mapping(document, "", _TOP_LEVEL_KEYS, what="the file")
    tls_settings, ssl_context = _parse_tls_server_config(
        config_file,
        config_file.mapping(top.get("tls_server_config"), "tls_server_config", _TLS_KEYS),
    )
    headers, http2 = _parse_http_server_config(
        config_file,
        config_file.mapping(top.get("http_server_config"), "http_server_config", _HTTP_KEYS),
    )
    users = _parse_basic_auth_users(config_file, top.get("basic_auth_users"))
    rate_limit = _parse_rate_limit(
        config_file, config_file.mapping(top.get("rate_limit"), "rate_limit", _RATE_LIMIT_KEYS)
    )
    return WebConfig(
        path=path,
        tls=tls_settings,
        ssl_context=ssl_context,
        headers=MappingProxyType(headers),
        http2=http2,
        basic_auth_users=MappingProxyType(users),
        rate_limit=rate_limit,
    )


class _StrictYAMLLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, as Go's yaml.UnmarshalStrict does.

    PyYAML silently keeps the last of two equal keys, which would hide, say, a
    second ``basic_auth_users`` entry for one user.
    """


def _construct_mapping_without_duplicates(
    loader: _StrictYAMLLoader, node: yaml.MappingNode
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor" merges are meant to be overridden
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable: construct_mapping reports that itself
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_StrictYAMLLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping_without_duplicates,
)


class _ConfigFile:
    """The file being loaded: where relative paths start, and how errors read."""

    def __init__(self, path: str) -> None:
        self.path = path
        # As in exporter-toolkit, relative file names in the config are
        # relative to the config file, not to the working directory.
        self.directory = os.path.dirname(os.path.abspath(path))

    def fail(self, problem: str) -> NoReturn:
        raise UserError(f"web config {self.path}: {_one_line(problem)}")

    def mapping(
        self, value: object, name: str, allowed_keys: tuple[str, ...], what: str = ""
    ) -> dict[str, Any]:
        """Check that ``value`` is a mapping with known string keys; ``None`` is empty."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(f"{what or name} must be a mapping, got {_describe(value)}")
        for key in value:
            if not isinstance(key, str) or key not in allowed_keys:
                self.fail(_unknown_key_text(_join_key(name, str(key)), str(key), allowed_keys))
        return value

    def string(self, section: Mapping[str, Any], prefix: str, key: str) -> str | None:
        """An optional string; missing, null and "" are all unset, as in Go."""
        value = section.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(f"{_join_key(prefix, key)} must be a string, got {_describe(value)}")
        return value or None

    def boolean(self, section: Mapping[str, Any], prefix: str, key: str, default: bool) -> bool:
        value = section.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(f"{_join_key(prefix, key)} must be true or false, got {_describe(value)}")
        return value

    def string_list(self, section: Mapping[str, Any], prefix: str, key: str) -> list[str]:
        value = section.get(key)
        if value is None:
            return []
        name = _join_key(prefix, key)
        if not isinstance(value, list):
            self.fail(f"{name} must be a list of strings, got {_describe(value)}")
        for item in value:
            if not isinstance(item, str):
                self.fail(f"{name} must be a list of strings, got the item {_describe(item)}")
        return value

    def resolve(self, path: str) -> str:
        return os.path.join(self.directory, path)

    def read(self, name: str, path: str) -> bytes:
        try:
            with open(path, "rb") as stream:
                return stream.read()
        except OSError as err:
            self.fail(f"{name} {path}: {_os_error_text(err)}")


def _parse_tls_server_config(
    config_file: _ConfigFile, section: Mapping[str, Any]
) -> tuple[TLSServerSettings | None, ssl.SSLContext | None]:
    if not section:
        return None, None
    prefix = "tls_server_config"

    def text(key: str) -> str | None:
        return config_file.string(section, prefix, key)

    cert_text, cert_file = text("cert"), text("cert_file")
    key_text, key_file = text("key"), text("key_file")
    client_ca_text, client_ca_file = text("client_ca"), text("client_ca_file")
    client_auth_type = text("client_auth_type")
    if not any((cert_text, cert_file, key_text, key_file, client_ca_text, client_ca_file)) and (
        client_auth_type is None
    ):
        # exporter-toolkit would serve plain HTTP here and ignore the rest.
        given = ", ".join(sorted(key for key, value in section.items() if value is not None))
        if not given:
            return None, None
        config_file.fail(
            f"{prefix} sets {given} but no certificate: add cert_file and key_file to serve"
            f" HTTPS, or remove {prefix} to serve plain HTTP"
        )

    def pem_source(inline_key: str, file_key: str, inline: str | None, path: str | None) -> str:
        if inline is not None and path is not None:
            config_file.fail(f"{prefix} sets both {inline_key} and {file_key}: keep one")
        if inline is None and path is None:
            config_file.fail(
                f"{prefix} is missing {file_key} (or {inline_key} with the PEM text inline)"
            )
        return "inline" if path is None else config_file.resolve(path)

    cert_source = pem_source("cert", "cert_file", cert_text, cert_file)
    key_source = pem_source("key", "key_file", key_text, key_file)

    min_version = text("min_version") or "TLS12"
    max_version = text("max_version") or "TLS13"
    for key, version in (("min_version", min_version), ("max_version", max_version)):
        if version not in _TLS_VERSIONS:
            config_file.fail(
                f"{prefix}.{key} {version!r} is not a TLS version: use one of "
                + ", ".join(_TLS_VERSIONS)
            )
    if _TLS_VERSIONS[min_version] > _TLS_VERSIONS[max_version]:
        config_file.fail(f"{prefix}.min_version {min_version} is above max_version {max_version}")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _TLS_VERSIONS[min_version]
    context.maximum_version = _TLS_VERSIONS[max_version]
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        logger.warning(
            "web config %s: %s.min_version %s: OpenSSL's system policy (security level) may"
            " still refuse TLS versions below 1.2",
            config_file.path,
            prefix,
            min_version,
        )

    cert_pem = (
        cert_text.encode()
        if cert_text is not None
        else config_file.read(f"{prefix}.cert_file", cert_source)
    )
    key_pem = (
        key_text.encode()
        if key_text is not None
        else config_file.read(f"{prefix}.key_file", key_source)
    )
    cert_name = f"{prefix}.cert" if cert_text is not None else f"{prefix}.cert_file {cert_source}"
    key_name = f"{prefix}.key" if key_text is not None else f"{prefix}.key_file {key_source}"
    _load_certificate_and_key(
        config_file,
        context,
        cert_pem=cert_pem,
        key_pem=key_pem,
        cert_name=cert_name,
        key_name=key_name,
    )

    client_auth_type = client_auth_type or "NoClientCert"
    if client_auth_type in _UNVERIFIED_CLIENT_AUTH_TYPES:
        config_file.fail(
            f"{prefix}.client_auth_type {client_auth_type} (a client certificate that is not"
            " verified) is not supported by Python's ssl module: use RequireAndVerifyClientCert"
            " with client_ca_file, or NoClientCert"
        )
    if client_auth_type not in _CLIENT_AUTH_MODES:
        config_file.fail(
            f"{prefix}.client_auth_type {client_auth_type!r} is not a client auth type: use one"
            " of " + ", ".join(_CLIENT_AUTH_MODES)
        )
    context.verify_mode = _CLIENT_AUTH_MODES[client_auth_type]

    client_ca_source: str | None = None
    if client_ca_text is not None and client_ca_file is not None:
        config_file.fail(f"{prefix} sets both client_ca and client_ca_file: keep one")
    if client_ca_text is not None or client_ca_file is not None:
        if context.verify_mode == ssl.CERT_NONE:
            config_file.fail(
                f"{prefix} sets a client CA but client_auth_type is NoClientCert: set"
                " client_auth_type to RequireAndVerifyClientCert, or remove the client CA"
            )
        if client_ca_text is not None:
            client_ca_source, ca_name, ca_pem = (
                "inline",
                f"{prefix}.client_ca",
                client_ca_text.encode(),
            )
        else:
            assert client_ca_file is not None
            client_ca_source = config_file.resolve(client_ca_file)
            ca_name = f"{prefix}.client_ca_file {client_ca_source}"
            ca_pem = config_file.read(f"{prefix}.client_ca_file", client_ca_source)
        _load_client_ca(config_file, context, ca_pem, ca_name)
    elif context.verify_mode != ssl.CERT_NONE:
        config_file.fail(
            f"{prefix}.client_auth_type {client_auth_type} needs the CA that signs client"
            " certificates: add client_ca_file"
        )

    allowed_sans = config_file.string_list(section, prefix, "client_allowed_sans")
    if allowed_sans and context.verify_mode != ssl.CERT_REQUIRED:
        config_file.fail(
            f"{prefix}.client_allowed_sans needs client_auth_type RequireAndVerifyClientCert"
            " (otherwise a client can connect without a certificate to match)"
        )

    cipher_suites = config_file.string_list(section, prefix, "cipher_suites")
    _apply_cipher_suites(config_file, context, cipher_suites)
    prefer_server_cipher_suites = config_file.boolean(
        section, prefix, "prefer_server_cipher_suites", default=True
    )
    if prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    curve_preferences = config_file.string_list(section, prefix, "curve_preferences")
    _apply_curve_preferences(config_file, context, curve_preferences)

    # The server speaks HTTP/1.1 only; saying so lets a client that offers h2
    # through ALPN settle on HTTP/1.1 instead of guessing.
    context.set_alpn_protocols(["http/1.1"])

    settings = TLSServerSettings(
        cert_source=cert_source,
        key_source=key_source,
        client_auth_type=client_auth_type,
        client_ca_source=client_ca_source,
        min_version=min_version,
        max_version=max_version,
        cipher_suites=tuple(cipher_suites),
        curve_preferences=tuple(curve_preferences),
        prefer_server_cipher_suites=prefer_server_cipher_suites,
        client_allowed_sans=frozenset(_normalise_san(san) for san in allowed_sans),
    )
    return settings, context


def _load_certificate_and_key(
    config_file: _ConfigFile,
    context: ssl.SSLContext,
    *,
    cert_pem: bytes,
    key_pem: bytes,
    cert_name: str,
    key_name: str,
) -> None:
    # OpenSSL's own error for these cases is an unhelpful "PEM lib".
    if _PEM_CERTIFICATE_MARKER not in cert_pem:
        config_file.fail(f"{cert_name}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    if not _PEM_PRIVATE_KEY_RE.search(key_pem):
        config_file.fail(f"{key_name}: no PEM private key in it (-----BEGIN PRIVATE KEY-----)")
    if b"ENCRYPTED" in key_pem:
        config_file.fail(f"{key_name}: the key is encrypted; give an unencrypted key")

    def refuse_password_prompt() -> str:
        # Without a callback OpenSSL would prompt on the terminal.
        raise _EncryptedKeyError

    # load_cert_chain only reads files. Memory files keep an inline key off
    # the disk, and reading the files ourselves gives clearer errors.
    try:
        with _memory_file("cert", cert_pem) as cert_path, _memory_file("key", key_pem) as key_path:
            context.load_cert_chain(cert_path, key_path, password=refuse_password_prompt)
    except _EncryptedKeyError:
        config_file.fail(f"{key_name}: the key is encrypted; give an unencrypted key")
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            config_file.fail(f"{key_name} is not the key of {cert_name}")
        config_file.fail(f"cannot load {cert_name} with {key_name}: {_ssl_error_text(err)}")


class _EncryptedKeyError(Exception):
    pass


@contextmanager
def _memory_file(name: str, content: bytes) -> Iterator[str]:
    """A path that reads ``content``, backed by memory only (Linux memfd)."""
    descriptor = os.memfd_create(f"tcptrace-ebpf-{name}", os.MFD_CLOEXEC)
    try:
        os.write(descriptor, content)
        yield f"/proc/self/fd/{descriptor}"
    finally:
        os.close(descriptor)


def _load_client_ca(
    config_file: _ConfigFile, context: ssl.SSLContext, ca_pem: bytes, ca_name: str
) -> None:
    if _PEM_CERTIFICATE_MARKER not in ca_pem:
        config_file.fail(f"{ca_name}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    try:
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except UnicodeDecodeError:
        config_file.fail(f"{ca_name}: not a PEM file (it has non-ASCII bytes)")
    except ssl.SSLError as err:
        config_file.fail(f"cannot load {ca_name}: {_ssl_error_text(err)}")


def _apply_cipher_suites(
    config_file: _ConfigFile, context: ssl.SSLContext, cipher_suites: list[str]
) -> None:
    name = "tls_server_config.cipher_suites"
    openssl_names: dict[str, str] = {}  # Go name -> OpenSSL name, in preference order
    for suite in cipher_suites:
        if suite in _TLS13_CIPHER_SUITES:
            continue
        if suite not in _TLS12_CIPHER_SUITES:
            config_file.fail(
                _unknown_key_text(
                    name,
                    suite,
                    (*_TLS12_CIPHER_SUITES, *sorted(_TLS13_CIPHER_SUITES)),
                    "cipher suite",
                )
            )
        openssl_names[suite] = _TLS12_CIPHER_SUITES[suite]
    if not openssl_names:
        return
    try:
        context.set_ciphers(":".join(openssl_names.values()))
    except ssl.SSLError:
        config_file.fail(f"{name}: none of these is available in this system's OpenSSL")
    available = {cipher["name"] for cipher in context.get_ciphers()}
    for suite, openssl_name in openssl_names.items():
        if openssl_name not in available:
            config_file.fail(f"{name}: {suite} is not available in this system's OpenSSL")


def _apply_curve_preferences(
    config_file: _ConfigFile, context: ssl.SSLContext, curves: list[str]
) -> None:
    name = "tls_server_config.curve_preferences"
    for curve in curves:
        if curve not in _CURVES:
            config_file.fail(_unknown_key_text(name, curve, tuple(_CURVES), "curve"))
    if not curves:
        return
    if len(curves) > 1:
        config_file.fail(
            f"{name}: Python's ssl module can limit key exchange to one curve only: list exactly"
            " one, or remove curve_preferences to let OpenSSL choose"
        )
    try:
        context.set_ecdh_curve(_CURVES[curves[0]])
    except (ValueError, ssl.SSLError):
        config_file.fail(
            f"{name}: {curves[0]} cannot be selected with this Python's ssl module: use"
            " CurveP256, CurveP384 or CurveP521, or remove curve_preferences"
        )


def _parse_http_server_config(
    config_file: _ConfigFile, section: Mapping[str, Any]
) -> tuple[dict[str, str], bool]:
    prefix = "http_server_config"
    # http2 is accepted, and true is the default, so that files written for
    # Go exporters load unchanged. Python's http.server speaks HTTP/1.1 only;
    # with http2 true the server still answers in HTTP/1.1 (over TLS it says
    # so through ALPN), which Prometheus handles. Failing on it instead would
    # reject nearly every file written for exporter-toolkit.
    http2 = config_file.boolean(section, prefix, "http2", default=True)
    headers_value = section.get("headers")
    headers: dict[str, str] = {}
    if headers_value is None:
        return headers, http2
    if not isinstance(headers_value, dict):
        config_file.fail(f"{prefix}.headers must be a mapping, got {_describe(headers_value)}")
    for header, value in headers_value.items():
        if not isinstance(header, str) or header not in _CONFIGURABLE_HEADERS:
            config_file.fail(
                f"{prefix}.headers: HTTP header {str(header)!r} cannot be configured; allowed: "
                + ", ".join(_CONFIGURABLE_HEADERS)
            )
        if value is None:
            continue  # blank means unset, as documented by exporter-toolkit
        if not isinstance(value, str):
            config_file.fail(f"{prefix}.headers.{header} must be a string, got {_describe(value)}")
        allowed_values = _CONFIGURABLE_HEADERS[header]
        if allowed_values and value not in allowed_values:
            config_file.fail(
                f"{prefix}.headers.{header} {value!r} is not allowed: use one of "
                + ", ".join(allowed_values)
            )
        if "\r" in value or "\n" in value:
            config_file.fail(f"{prefix}.headers.{header} must be one line")
        if value:  # blank means unset, as documented by exporter-toolkit
            headers[header] = value
    return headers, http2


def _parse_basic_auth_users(config_file: _ConfigFile, value: object) -> dict[str, bytes]:
    name = "basic_auth_users"
    if value is None:
        return {}
    if not isinstance(value, dict):
        config_file.fail(
            f"{name} must be a mapping of user names to bcrypt hashes, got {_describe(value)}"
        )
    users: dict[str, bytes] = {}
    for username, password_hash in value.items():
        if not isinstance(username, str):
            config_file.fail(
                f"{name}: the user name {_describe(username)} must be a string: quote it"
            )
        if ":" in username:
            config_file.fail(
                f"{name}: the user name {username!r} has a ':', which HTTP basic auth cannot carry"
            )
        if not isinstance(password_hash, str) or not _BCRYPT_HASH_RE.fullmatch(password_hash):
            shown = _describe(password_hash) if not isinstance(password_hash, str) else "it"
            config_file.fail(f"{name}.{username}: {shown} is not a bcrypt hash; {_HTPASSWD_HINT}")
        match = _BCRYPT_HASH_RE.fullmatch(password_hash)
        assert match is not None
        if not 4 <= int(match["cost"]) <= 31:
            config_file.fail(
                f"{name}.{username}: the bcrypt cost must be 4 to 31; {_HTPASSWD_HINT}"
            )
        users[username] = password_hash.encode("ascii")
    return users


def _parse_rate_limit(
    config_file: _ConfigFile, section: Mapping[str, Any]
) -> RateLimitSettings | None:
    prefix = "rate_limit"
    interval_value = section.get("interval")
    burst_value = section.get("burst", 0)
    if interval_value is None or interval_value == 0:
        interval_seconds = 0.0
    elif (
        isinstance(interval_value, str)
        and (parsed := _parse_go_duration(interval_value)) is not None
    ):
        interval_seconds = parsed
    else:
        config_file.fail(
            f"{prefix}.interval {_describe(interval_value)} is not a duration: write it like"
            " 1s, 100ms or 1m30s (0 turns the limit off)"
        )
    if isinstance(burst_value, bool) or not isinstance(burst_value, int) or burst_value < 0:
        config_file.fail(
            f"{prefix}.burst must be a whole number >= 0, got {_describe(burst_value)}"
        )
    if interval_seconds == 0:
        return None
    if burst_value < 1:
        config_file.fail(
            f"{prefix}.burst must be at least 1 when interval is set (0 would refuse every request)"
        )
    return RateLimitSettings(interval_seconds=interval_seconds, burst=burst_value)


def _parse_go_duration(text: str) -> float | None:
    """Seconds in a Go duration (``1m30s``, ``250ms``); None if it is not one."""
    if text == "0":
        return 0.0
    total, position = 0.0, 0
    while position < len(text):
        match = _GO_DURATION_PART_RE.match(text, position)
        if match is None:
            return None
        total += float(match[1]) * _GO_DURATION_UNIT_SECONDS[match[2]]
        position = match.end()
    return total if text else None


def _normalise_san(san: str) -> str:
    try:
        return str(ipaddress.ip_address(san))
    except ValueError:
        return san


def _join_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _unknown_key_text(name: str, value: str, allowed: tuple[str, ...], kind: str = "key") -> str:
    if kind == "key":
        # Misspelt keys are the usual mistake, and a close match finds them.
        close = difflib.get_close_matches(value, allowed, n=1)
        if close:
            return f"unknown key {name} (did you mean {close[0]}?)"
        return f"unknown key {name}; expected one of: {', '.join(allowed)}"
    # Unknown values are more often another library's names (Curve25519 for
    # X25519), where the closest spelling misleads: list them all.
    return f"{name}: unknown {kind} {value!r}; use one of: {', '.join(allowed)}"


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{shown} ({type(value).__name__})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _os_error_text(err: OSError) -> str:
    if err.strerror:
        return err.strerror[0].lower() + err.strerror[1:]
    return str(err)


def _ssl_error_text(err: ssl.SSLError) -> str:
    # "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found (_ssl.c:4123)"
    # reads better without the library tag and the C source location.
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(err.args[1] if len(err.args) > 1 else err))
    return re.sub(r"^\[[^\]]*\]\s*", "", text) or str(err)


def _yaml_error_text(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark or err.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = err.problem or err.context or "cannot parse"
    return f"invalid YAML{where}: {problem}"


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


class _BasicAuthVerifier:
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


class _TokenBucket:
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
class _Site:
    """What the scrape workers serve; shared, read-only per request."""

    registry: CollectorRegistry
    telemetry_path: str
    landing_page: bytes
    routes: Mapping[str, RouteHandler]
    headers: Mapping[str, str]
    basic_auth: _BasicAuthVerifier | None
    rate_limiter: _TokenBucket | None
    # False while the metrics are not worth scraping yet (the daemon has not
    # started tracing): the telemetry path answers 503 until then.
    ready: Callable[[], bool] = lambda: True


@dataclass
class _Request:
    """A parsed request head, as the page logic needs it."""

    method: str
    target: str
    headers: Mapping[str, str]  # lower-case names; the first of repeated ones
    client: str


@dataclass
class _Reply:
    status: int
    content_type: str
    body: bytes
    send_body: bool = True
    headers: list[tuple[str, str]] = field(default_factory=list)


# The standard methods nothing here serves get 405; methods nobody defines
# (FOO) get 501, the status HTTP asks for an unrecognised method.
_KNOWN_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})


def _text_reply(
    status: int, text: str, send_body: bool, headers: Iterable[tuple[str, str]] = ()
) -> _Reply:
    return _Reply(
        status,
        "text/plain; charset=utf-8",
        f"{text}\n".encode(),
        send_body,
        [("X-Content-Type-Options", "nosniff"), *headers],
    )


def _answer(site: _Site, request: _Request) -> _Reply:
    """The page for one request: runs in a scrape worker (it may collect metrics or bcrypt)."""
    send_body = request.method != "HEAD"
    if request.method not in ("GET", "HEAD") and request.method not in _KNOWN_METHODS:
        return _text_reply(501, "Not Implemented", True)
    if site.rate_limiter is not None and not site.rate_limiter.allow():
        return _text_reply(429, "Too Many Requests", send_body)
    if site.basic_auth is not None and not site.basic_auth.is_authorized(
        request.headers.get("authorization")
    ):
        return _text_reply(401, "Unauthorized", send_body, [("WWW-Authenticate", "Basic")])
    if request.method not in ("GET", "HEAD"):
        return _text_reply(405, "Method Not Allowed", send_body, [("Allow", _ALLOWED_METHODS)])
    url = urlsplit(request.target)
    if url.path == site.telemetry_path:
        if not site.ready():
            return _text_reply(503, "Service Unavailable: tracing has not started yet", send_body)
        return _metrics_reply(site, request, url.query, send_body)
    if url.path == "/":
        return _Reply(200, "text/html; charset=utf-8", site.landing_page, send_body)
    route = site.routes.get(url.path)
    if route is None:
        return _text_reply(404, "Not Found", send_body)
    try:
        status, content_type, body = route()
    except Exception:
        logger.exception("handling %s for %s failed", url.path, request.client)
        return _text_reply(500, "Internal Server Error", send_body)
    return _Reply(status, content_type, body, send_body)


def _metrics_reply(site: _Site, request: _Request, query: str, send_body: bool) -> _Reply:
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
        return _text_reply(500, "Internal Server Error: collecting metrics failed", send_body)
    headers = [("Vary", "Accept-Encoding")]
    if _gzip_accepted(request.headers.get("accept-encoding")):
        body = gzip.compress(body, compresslevel=_GZIP_LEVEL)
        headers.append(("Content-Encoding", "gzip"))
    return _Reply(200, content_type, body, send_body, headers)


def _raw_error(status: int, reason: str, text: str) -> bytes:
    """A whole response that closes the connection, for when h11 cannot frame one."""
    body = f"{text}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


# What Go's net/http answers plain HTTP sent to a TLS port with.
_PLAIN_HTTP_TO_TLS_PORT = (
    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_TLS_HANDSHAKE_RECORD = b"\x16"


def _listen_backlog() -> int:
    # The host's own limit: the kernel caps a larger backlog to it anyway,
    # and a burst of scrapers should wait in the queue, not be refused.
    try:
        with open("/proc/sys/net/core/somaxconn") as stream:
            return max(1, int(stream.read().strip()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


class _Connection:
    """One client connection, as the event loop tracks it."""

    def __init__(self, sock: socket.socket, client: str) -> None:
        self.sock = sock
        self.client = client
        self.writer: asyncio.StreamWriter | None = None
        # Waiting for (or reading) a request head, not being answered: what
        # may be closed to make room for a new connection.
        self.idle = True
        self.task: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            _close_quietly(self.sock)


class _Server:
    """The serving core: one asyncio event loop thread for every connection
    (TLS handshakes, reading request heads, writing answers) and a fixed pool
    of scrape workers for what takes CPU or blocks (collecting metrics,
    bcrypt, routes). Slow or silent clients cost a socket and a little
    memory, never a thread; there are at most ``MAX_CONNECTIONS`` of them,
    and when that many are open the one that has waited longest without
    sending a whole request is closed to make room.
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        site: _Site,
        ssl_context: ssl.SSLContext | None,
        client_allowed_sans: frozenset[str],
    ) -> None:
        self.listener = listener
        self.site = site
        self.ssl_context = ssl_context
        self.client_allowed_sans = client_allowed_sans
        self.loop = asyncio.new_event_loop()
        self.connections: OrderedDict[int, _Connection] = OrderedDict()
        self.workers = ThreadPoolExecutor(
            max_workers=SCRAPE_WORKERS, thread_name_prefix="tcptrace-ebpf-scrape"
        )
        # Made here, not in the loop: stop() may come before the loop runs.
        self._stopped = asyncio.Event()
        self._next_id = 0

    def start_workers(self) -> None:
        """Start every worker thread now, while the process may: under a task
        limit (TasksMax, a pids cgroup) later is too late."""
        barrier = threading.Barrier(SCRAPE_WORKERS + 1)
        for _ in range(SCRAPE_WORKERS):
            self.workers.submit(barrier.wait, 10)
        barrier.wait(10)

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    def stop(self) -> None:
        """From another thread: close everything; run() returns."""

        with suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(self._stopped.set)

    async def _serve(self) -> None:
        self.listener.setblocking(False)
        accepting = asyncio.ensure_future(self._accept_forever())
        await self._stopped.wait()
        accepting.cancel()
        with suppress(asyncio.CancelledError):
            await accepting
        self.listener.close()
        tasks = [conn.task for conn in self.connections.values() if conn.task is not None]
        for conn in list(self.connections.values()):
            conn.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self.workers.shutdown(wait=False, cancel_futures=True)

    async def _accept_forever(self) -> None:
        while True:
            try:
                sock, address = await self.loop.sock_accept(self.listener)
            except OSError as err:
                # EMFILE and the like: the listen queue keeps the client
                # waiting; try again shortly rather than spin.
                logger.warning("cannot accept a connection: %s", _os_error_text(err))
                await asyncio.sleep(0.1)
                continue
            client = str(address[0]) if isinstance(address, tuple) else "?"
            self._make_room()
            self._next_id += 1
            conn = _Connection(sock, client)
            self.connections[self._next_id] = conn
            conn.task = asyncio.ensure_future(self._handle(self._next_id, conn))

    def _make_room(self) -> None:
        if len(self.connections) < MAX_CONNECTIONS:
            return
        for conn_id, conn in self.connections.items():  # oldest first
            if conn.idle:
                logger.debug(
                    "%s: closed to make room (%d connections)", conn.client, len(self.connections)
                )
                del self.connections[conn_id]
                conn.close()
                if conn.task is not None:
                    conn.task.cancel()
                return

    async def _handle(self, conn_id: int, conn: _Connection) -> None:
        try:
            await self._serve_connection(conn)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
            logger.debug("%s: connection error: %s", conn.client, err)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("%s: error while serving a connection", conn.client)
        finally:
            self.connections.pop(conn_id, None)
            conn.close()

    async def _serve_connection(self, conn: _Connection) -> None:
        sock = conn.sock
        with suppress(OSError):
            # Headers and body go out in one write here, but a response
            # must never wait for the client's delayed ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = asyncio.StreamReader(limit=MAX_REQUEST_HEAD_BYTES * 4, loop=self.loop)
        started = self.loop.time()
        if self.ssl_context is not None:
            if not await self._wait_readable(sock, TLS_HANDSHAKE_TIMEOUT_SECONDS):
                return
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                return
            if first != _TLS_HANDSHAKE_RECORD:
                with suppress(OSError):
                    sock.send(_PLAIN_HTTP_TO_TLS_PORT)
                return
            try:
                transport, protocol = await self.loop.connect_accepted_socket(
                    lambda: asyncio.StreamReaderProtocol(reader),
                    sock=sock,
                    ssl=self.ssl_context,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_SECONDS,
                )
            except (TimeoutError, OSError, ConnectionError) as err:
                logger.debug("%s: TLS handshake failed: %s", conn.client, err)
                return
            conn.writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
            if self.client_allowed_sans and not _has_allowed_san(
                transport.get_extra_info("peercert"), self.client_allowed_sans
            ):
                logger.warning(
                    "%s: client certificate has none of the SANs in client_allowed_sans;"
                    " connection closed",
                    conn.client,
                )
                return
            # The handshake may have taken most of the head's time: the
            # request head gets its own.
            started = self.loop.time()
        else:
            transport, protocol = await self.loop.connect_accepted_socket(
                lambda: asyncio.StreamReaderProtocol(reader), sock=sock
            )
            conn.writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
        await self._serve_requests(conn, reader, conn.writer, started)

    async def _wait_readable(self, sock: socket.socket, timeout: float) -> bool:
        ready: asyncio.Future[None] = self.loop.create_future()

        def on_readable() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_reader(sock.fileno(), on_readable)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return False
        finally:
            self.loop.remove_reader(sock.fileno())
        return True

    async def _serve_requests(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        started: float,
    ) -> None:
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        # A new connection has REQUEST_HEAD_TIMEOUT_SECONDS from its start
        # for its first request head; a kept-alive one may idle for
        # CONNECTION_IDLE_TIMEOUT_SECONDS, then has as long for the head
        # from its first byte. Per head, not per read: a byte every few
        # seconds does not keep a connection.
        head_deadline: float | None = started + REQUEST_HEAD_TIMEOUT_SECONDS
        while True:
            conn.idle = True
            idle_deadline = self.loop.time() + CONNECTION_IDLE_TIMEOUT_SECONDS
            try:
                event = await self._next_event(http, reader, head_deadline, idle_deadline)
            except h11.RemoteProtocolError as err:
                status = err.error_status_hint
                reason = {431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}
                writer.write(
                    _raw_error(status, reason.get(status, "Bad Request"), f"Bad Request: {err}")
                )
                await self._drain(writer)
                return
            if event is None:  # the head did not come in time
                if http.their_state is h11.IDLE and not http.trailing_data[0]:
                    return  # nothing started: just close, as Go does
                writer.write(_raw_error(408, "Request Timeout", "Request Timeout"))
                await self._drain(writer)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            conn.idle = False
            request = _request_of(event, conn.client)
            reply = await self.loop.run_in_executor(self.workers, _answer, self.site, request)
            has_body = (
                "content-length" in request.headers
                and request.headers["content-length"].strip() != "0"
            ) or "transfer-encoding" in request.headers
            writer.write(self._encode(http, reply, close=has_body))
            await self._drain(writer)
            if not has_body and http.their_state is h11.SEND_BODY:
                http.next_event()  # the EndOfMessage of a request without a body
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return  # closing (HTTP/1.0, Connection: close, an unread body)
            http.start_next_cycle()
            head_deadline = None

    async def _next_event(
        self,
        http: h11.Connection,
        reader: asyncio.StreamReader,
        head_deadline: float | None,
        idle_deadline: float,
    ) -> Any:
        while True:
            event = http.next_event()
            if event is not h11.NEED_DATA:
                return event
            deadline = head_deadline if head_deadline is not None else idle_deadline
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return None
            try:
                data = await asyncio.wait_for(reader.read(65536), remaining)
            except TimeoutError:
                return None
            http.receive_data(data)
            if data and head_deadline is None:
                head_deadline = self.loop.time() + REQUEST_HEAD_TIMEOUT_SECONDS

    @staticmethod
    async def _drain(writer: asyncio.StreamWriter) -> None:
        # A client that does not read its answer holds the connection this
        # long at most.
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_SECONDS)

    def _encode(self, http: h11.Connection, reply: _Reply, close: bool) -> bytes:
        headers = [
            ("Server", "tcptrace-ebpf"),
            ("Date", formatdate(usegmt=True)),
        ]
        if close:
            # No page here reads a request body; on a kept-alive connection
            # the unread body would be taken for the next request.
            headers.append(("Connection", "close"))
        sent = set()
        for name, value in reply.headers:
            headers.append((name, value))
            sent.add(name.lower())
        for name, value in self.site.headers.items():
            if name.lower() not in sent:
                headers.append((name, value))
        headers.append(("Content-Type", reply.content_type))
        headers.append(("Content-Length", str(len(reply.body))))
        data = http.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if reply.send_body and reply.body:
            data += http.send(h11.Data(data=reply.body)) or b""
        data += http.send(h11.EndOfMessage()) or b""
        return data


def _request_of(event: h11.Request, client: str) -> _Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return _Request(
        method=event.method.decode("ascii", "replace"),
        target=event.target.decode("ascii", "replace"),
        headers=headers,
        client=client,
    )


def _has_allowed_san(peer_certificate: Any, allowed_sans: frozenset[str]) -> bool:
    # getpeercert() lists ("DNS", "x"), ("IP Address", "1.2.3.4"),
    # ("email", "a@b"), ("URI", "spiffe://...") under subjectAltName: the
    # kinds exporter-toolkit matches.
    if not peer_certificate:
        return False
    for _kind, value in peer_certificate.get("subjectAltName", ()):
        if _normalise_san(str(value).strip()) in allowed_sans:
            return True
    return False


def _close_quietly(connection: socket.socket) -> None:
    # A FIN before closing, as socketserver does for plain sockets, so a
    # client reading the end of the response gets it rather than a reset.
    with suppress(OSError):
        socket.socket.shutdown(connection, socket.SHUT_WR)
    connection.close()


def _landing_page(title: str, links: Iterable[str]) -> bytes:
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


class MetricsServer:
    """Serves a Prometheus registry over HTTP or HTTPS from a background thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen_address: tuple[str, int],
        telemetry_path: str = "/metrics",
        web_config: WebConfig | None = None,
        landing_page_title: str = "tcptrace-ebpf",
        *,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        """``ready()`` False makes the telemetry path answer 503 (the daemon
        passes "tracing has started"); the other pages answer regardless."""
        if not telemetry_path.startswith("/") or any(c in telemetry_path for c in "?# \t\r\n"):
            raise UserError(
                f"invalid {TELEMETRY_PATH_OPTION} {telemetry_path!r}: give a URL path that starts"
                " with '/', e.g. /metrics"
            )
        self._listen_address = listen_address
        self._telemetry_path = telemetry_path
        self._web_config = web_config
        self._landing_page_title = landing_page_title
        self._routes: dict[str, RouteHandler] = {}
        self._site = _Site(
            registry=registry,
            telemetry_path=telemetry_path,
            landing_page=_landing_page(landing_page_title, [telemetry_path]),
            routes=MappingProxyType(self._routes),
            headers=web_config.headers if web_config else {},
            basic_auth=(
                _BasicAuthVerifier(web_config.basic_auth_users)
                if web_config and web_config.basic_auth_users
                else None
            ),
            rate_limiter=(
                _TokenBucket(web_config.rate_limit)
                if web_config and web_config.rate_limit
                else None
            ),
            ready=ready,
        )
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._lifecycle_lock = threading.Lock()
        self._shut_down = False

    def add_route(self, path: str, handler: RouteHandler) -> None:
        """Serve ``handler()``'s ``(status, content_type, body)`` at ``path`` (GET/HEAD).

        Basic auth and the configured headers apply as to every other page.
        """
        if not path.startswith("/") or path in (self._telemetry_path, "/") or path in self._routes:
            raise ValueError(f"cannot add route {path!r}: it must start with '/' and be new")
        self._routes[path] = handler
        self._site.landing_page = _landing_page(
            self._landing_page_title, [self._telemetry_path, *self._routes]
        )

    @property
    def scheme(self) -> str:
        """``https`` when a TLS certificate is configured, else ``http``."""
        return "https" if self._web_config and self._web_config.ssl_context else "http"

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound; with port 0 asked, the port picked."""
        if self._server is None:
            raise RuntimeError("MetricsServer.address is known only after start()")
        host, port = self._server.listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve in a daemon thread. Bind problems raise ``UserError``."""
        with self._lifecycle_lock:
            if self._server is not None or self._shut_down:
                raise RuntimeError("MetricsServer.start() can be called once")
            host, port = self._listen_address
            shown_address = _format_address(host, port)
            family, bind_address, dual_stack = _bind_target(host, port, shown_address)
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if dual_stack:
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                listener.bind(bind_address)
                listener.listen(_listen_backlog())
            except OSError as err:
                listener.close()
                raise UserError(
                    f"cannot listen on {shown_address}: {_bind_error_text(err)}"
                ) from err
            tls = self._web_config.tls if self._web_config else None
            server = _Server(
                listener,
                site=self._site,
                ssl_context=self._web_config.ssl_context if self._web_config else None,
                client_allowed_sans=tls.client_allowed_sans if tls else frozenset(),
            )
            try:
                server.start_workers()
                thread = threading.Thread(target=server.run, name="tcptrace-ebpf-http", daemon=True)
                thread.start()
            except (RuntimeError, threading.BrokenBarrierError) as err:
                server.workers.shutdown(wait=False)
                listener.close()
                raise UserError(
                    f"cannot start the HTTP server's {SCRAPE_WORKERS + 1} threads ({err}): raise"
                    " the task limit (systemd TasksMax, the container's pids limit)"
                ) from err
            self._server = server
            self._serve_thread = thread
        bound_host, bound_port = self.address
        logger.info(
            "serving metrics on %s://%s%s (basic auth %s)",
            self.scheme,
            _format_address(bound_host, bound_port),
            self._telemetry_path,
            "on" if self._site.basic_auth else "off",
        )

    def shutdown(self) -> None:
        """Stop serving, close the socket and open connections. Safe to call twice."""
        with self._lifecycle_lock:
            if self._shut_down:
                return
            self._shut_down = True
            if self._server is not None:
                self._server.stop()
            if self._serve_thread is not None:
                self._serve_thread.join(timeout=10)


def _bind_target(
    host: str, port: int, shown_address: str
) -> tuple[socket.AddressFamily, tuple[Any, ...], bool]:
    """Address family and socket address to bind, and whether to take IPv4 too on IPv6."""
    if host == "":
        # ":PORT" means every interface, IPv4 and IPv6, as in Go.
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, ("::", port), True
        return socket.AF_INET, ("0.0.0.0", port), False
    try:
        candidates = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise UserError(
            f"cannot listen on {shown_address}: cannot resolve {host!r} ({err.strerror}); use an"
            f" IP address in {LISTEN_ADDRESS_OPTION}"
        ) from err
    # Like Go, prefer IPv4 when a name resolves to both.
    candidates.sort(key=lambda candidate: candidate[0] != socket.AF_INET)
    family, _type, _proto, _canonname, socket_address = candidates[0]
    return family, socket_address, False


def _bind_error_text(err: OSError) -> str:
    hints = {
        errno.EADDRINUSE: "address already in use (is another tcptrace-ebpf running? pick"
        f" another port with {LISTEN_ADDRESS_OPTION})",
        errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE;"
        f" pick a port from 1024 up with {LISTEN_ADDRESS_OPTION})",
        errno.EADDRNOTAVAIL: "cannot assign requested address (no interface of this host has"
        f" that address; check {LISTEN_ADDRESS_OPTION})",
        errno.EAFNOSUPPORT: "address family not supported (is IPv6 disabled? use an IPv4"
        f" address in {LISTEN_ADDRESS_OPTION})",
    }
    if err.errno in hints:
        return hints[err.errno]
    return _os_error_text(err)
