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

import difflib
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from ..errors import UserError

logger = logging.getLogger(__name__)

LISTEN_ADDRESS_OPTION = "--web.listen-address"
_LISTEN_ADDRESS_EXAMPLE = "0.0.0.0:9100"

# Matches what the bcrypt package can check: $2a$, $2b$, $2x$ or $2y$, a
# two-digit cost, then 22 characters of salt and 31 of hash.
_BCRYPT_HASH_RE = re.compile(r"\$2[abxy]\$(?P<cost>[0-9]{2})\$[./A-Za-z0-9]{53}")
_HTPASSWD_HINT = "generate one with: htpasswd -nBC 10 '' | tr -d ':\\n'"

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


def format_address(host: str, port: int) -> str:
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
        config_file.fail(f"cannot read the file: {os_error_text(err)}")
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
            self.fail(f"{name} {path}: {os_error_text(err)}")


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
        client_allowed_sans=frozenset(normalise_san(san) for san in allowed_sans),
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


def normalise_san(san: str) -> str:
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


def os_error_text(err: OSError) -> str:
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
