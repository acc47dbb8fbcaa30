"""TLS: the server's SSL context, built from the settings, and what the workers need of it.

The master builds the context (`server_context`) before it binds, so that a missing or
mismatched certificate is one line and exit status 2; on HUP it builds a new one from the
files as they are then, and the workers forked after that serve with it (certificate
renewal without a restart). Workers never read the key files themselves, so the files may
stay readable by root only while the workers run as --user.

Every connection on a TLS-enabled server starts with a look at its first byte: a TLS
record starts with 0x16 (handshake); a client that speaks plain HTTP to the port instead gets
a plain-text 400 saying so (`PLAIN_HTTP_EXPLAIN`), rather than a handshake failure it cannot
display.
"""

from __future__ import annotations

import ssl
from typing import Any

from forkserve.errors import ConfigError

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
CLIENT_CERT_MODES = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
ALPN_PROTOCOLS = ["http/1.1"]

# The first byte of a TLS record carrying a handshake message (a ClientHello).
HANDSHAKE_RECORD = 0x16

PLAIN_HTTP_EXPLAIN = "this port expects HTTPS; the request was plain HTTP"


def server_context(cfg: Any) -> ssl.SSLContext | None:
    """The SSL context the settings ask for, or None when --certfile is not given.

    Raises ConfigError (one line naming the setting and the file) for a certificate or key
    that cannot be read or do not match, CA certificates that cannot be loaded, a cipher
    string OpenSSL rejects, or TLS options given without --certfile.
    """
    if not cfg.certfile:
        for name, flag in (("keyfile", "--keyfile"), ("ca_certs", "--ca-certs"),
                           ("ciphers", "--ciphers")):
            if getattr(cfg, name):
                raise ConfigError(f"{flag} needs --certfile (TLS is off without it)")
        if cfg.client_cert != "none":
            raise ConfigError("--client-cert needs --certfile (TLS is off without it)")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[cfg.tls_min_version]
    for flag, path in (("--certfile", cfg.certfile), ("--keyfile", cfg.keyfile),
                       ("--ca-certs", cfg.ca_certs)):
        if path:
            try:
                open(path, "rb").close()
            except OSError as exc:  # OpenSSL's own message would not name the file
                raise ConfigError(f"cannot read {flag} {path}: {exc.strerror}") from None
    try:
        context.load_cert_chain(cfg.certfile, cfg.keyfile, password=_no_passphrase)
    except EncryptedKey:
        raise ConfigError(f"the private key in {cfg.keyfile or cfg.certfile} is encrypted; "
                          "give it unencrypted (readable by root only)") from None
    except OSError as exc:  # ssl.SSLError included: no key, not PEM, key does not match
        files = cfg.certfile + (f" and --keyfile {cfg.keyfile}" if cfg.keyfile else "")
        raise ConfigError(f"cannot load --certfile {files}: {_reason(exc)}") from None
    if cfg.ciphers:
        try:
            context.set_ciphers(cfg.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"--ciphers {cfg.ciphers!r}: OpenSSL accepts none of "
                              "these ciphers") from None
    if cfg.client_cert != "none" and not cfg.ca_certs:
        raise ConfigError(f"--client-cert {cfg.client_cert} needs --ca-certs, the CAs "
                          "that sign client certificates")
    if cfg.ca_certs:
        try:
            context.load_verify_locations(cafile=cfg.ca_certs)
        except OSError as exc:
            raise ConfigError(f"cannot load --ca-certs {cfg.ca_certs}: {_reason(exc)}") \
                from None
    context.verify_mode = CLIENT_CERT_MODES[cfg.client_cert]
    context.options |= ssl.OP_NO_RENEGOTIATION  # client renegotiation: a cheap CPU drain
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


class EncryptedKey(Exception):
    """The private key needs a passphrase."""


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal and block the master.
    raise EncryptedKey


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason in (None, "PEM_LIB"):  # OpenSSL says no more than "PEM lib"
            return ("no PEM certificate with its private key found (give --keyfile when the "
                    "key is in a file of its own)")
        return exc.reason.lower().replace("_", " ")
    return exc.strerror or str(exc)


def is_plain_http(first_byte: bytes) -> bool:
    """Whether a connection's first byte shows a client speaking HTTP, not TLS, to a TLS
    port (request methods start with an upper-case letter)."""
    return bool(first_byte) and first_byte[0] != HANDSHAKE_RECORD and first_byte.isupper()


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension (`scope["extensions"]["tls"]`) of an established connection:
    the negotiated version and cipher suite, and the client's certificate when it sent one."""
    cipher = ssl_object.cipher()
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": _rfc4514(ssl_object.getpeercert()) if der else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSION_CODES.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_suite_id(ssl_object.context, cipher[0]) if cipher else None,
    }


def tls_environ(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, str]:
    """WSGI environ variables of an established connection, named as Apache's mod_ssl names
    them: HTTPS, SSL_PROTOCOL, SSL_CIPHER and, when the client sent a certificate,
    SSL_CLIENT_CERT (PEM) and SSL_CLIENT_S_DN (RFC 4514)."""
    cipher = ssl_object.cipher()
    variables = {"HTTPS": "on", "SSL_PROTOCOL": ssl_object.version() or "",
                 "SSL_CIPHER": cipher[0] if cipher else ""}
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        variables["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(der)
        variables["SSL_CLIENT_S_DN"] = _rfc4514(ssl_object.getpeercert()) or ""
    return variables


_TLS_VERSION_CODES = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# RFC 4514 §3 short names of the attribute types Python's ssl spells out.
_SHORT_NAMES = {
    "commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST",
    "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
}


def _cipher_suite_id(context: ssl.SSLContext, name: str) -> int | None:
    """The 16-bit IANA number of the cipher suite OpenSSL calls `name` (numbers do not
    change with the context, so the table is read once, not on every connection)."""
    if name not in _CIPHER_SUITE_IDS:
        _CIPHER_SUITE_IDS.update((cipher["name"], cipher["id"] & 0xFFFF)
                                 for cipher in context.get_ciphers())
    return _CIPHER_SUITE_IDS.get(name)


_CIPHER_SUITE_IDS: dict[str, int] = {}


def _rfc4514(cert: dict[str, Any]) -> str | None:
    """A certificate's subject as an RFC 4514 string, most specific part first."""
    parts = []
    for rdn in reversed(cert.get("subject", ())):
        parts.append("+".join(f"{_SHORT_NAMES.get(name, name)}={_escape_dn(value)}"
                              for name, value in rdn))
    return ",".join(parts) or None


def _escape_dn(value: str) -> str:
    escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped
