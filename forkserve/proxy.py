"""Proxy headers: who the client really is, when a trusted proxy says so.

Behind nginx or a load balancer every connection comes from the proxy. The proxy reports the
client's address, the scheme and the host in `Forwarded` (RFC 7239) or `X-Forwarded-For`,
`X-Forwarded-Proto` and `X-Forwarded-Host`. Those headers are believed only on connections
from `--forwarded-allow-ips` (addresses, CIDR networks, `unix` for unix-socket connections,
or `*`); from anyone else they are ignored, since any client can send them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from forkserve.errors import ConfigError

DEFAULT_TRUSTED = "127.0.0.1,::1,unix"
KNOWN_HOSTS = 4096  # answers kept (TrustedProxies.trusts)


class TrustedProxies:
    """The `--forwarded-allow-ips` list."""

    def __init__(self, spec: str) -> None:
        self.everyone = False
        self.unix = False
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        # Answers for the hosts seen lately: parsing an address costs more than a request.
        self._known: dict[str, bool] = {}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            if item == "*":
                self.everyone = True
            elif item == "unix":
                self.unix = True
            else:
                try:
                    self.networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise ConfigError(f"--forwarded-allow-ips: {item!r} is not an address, "
                                      "a network, 'unix' or '*'") from None

    def trusts(self, host: str | None) -> bool:
        """Is a peer at `host` (None or "" for a unix socket) a trusted proxy?"""
        if self.everyone:
            return True
        if not host:
            return self.unix
        known = self._known.get(host)
        if known is None:
            known = self._trusts(host)
            if len(self._known) >= KNOWN_HOSTS:
                self._known.clear()
            self._known[host] = known
        return known

    def _trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:  # an IPv4 peer of a [::] socket
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What trusted proxies said about the client; None where they said nothing."""

    client: str | None = None
    port: int | None = None
    scheme: str | None = None
    host: str | None = None


def forwarded(headers: list[tuple[bytes, bytes]], proxies: TrustedProxies) -> Forwarded:
    """Read the proxy headers of a request that came from a trusted proxy.

    The client is the rightmost address in the chain that is not itself a trusted proxy
    (each proxy appends the address it saw), or the leftmost one if all are trusted.
    """
    chain: list[str] = []
    scheme = host = None
    standard: list[dict[str, str]] = []
    for name, value in headers:
        if name == b"forwarded":
            standard += _parse_forwarded(value.decode("latin-1"))
        elif name == b"x-forwarded-for":
            chain += [part.strip() for part in value.decode("latin-1").split(",")]
        elif name == b"x-forwarded-proto":
            scheme = value.decode("latin-1").split(",")[-1].strip().lower()
        elif name == b"x-forwarded-host":
            host = value.decode("latin-1").split(",")[-1].strip()
    if standard:  # RFC 7239 wins over the X- headers
        chain = [element.get("for", "") for element in standard]
        scheme = standard[-1].get("proto", "").lower() or None
        host = standard[-1].get("host") or None
    if scheme not in (None, "http", "https", "ws", "wss"):
        scheme = None
    client = port = None
    for entry in reversed(chain):
        client, port = _split_node(entry)
        if client is None or not proxies.trusts(client):
            break
    return Forwarded(client, port, scheme, host)


def _parse_forwarded(text: str) -> list[dict[str, str]]:
    elements = []
    for element in text.split(","):
        pairs = {}
        for pair in element.split(";"):
            key, _, value = pair.strip().partition("=")
            if key:
                pairs[key.lower()] = value.strip().strip('"')
        elements.append(pairs)
    return elements


def _split_node(node: str) -> tuple[str | None, int | None]:
    """'1.2.3.4', '1.2.3.4:80', '[::1]:80', '::1', 'unknown' → (address, port)."""
    if node.startswith("["):
        address, _, rest = node[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif node.count(":") == 1:
        address, _, port = node.partition(":")
    else:
        address, port = node, ""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None, None  # "unknown", an obfuscated identifier, garbage
    return address, int(port) if port.isdigit() else None
