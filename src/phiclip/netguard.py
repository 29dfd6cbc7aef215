"""The address guard against server-side request forgery: a server that fetches URLs its clients name
(``phiclip serve``'s image URLs) must not be made to reach its own machine or its private network.

:func:`refusal` says why an IP address is not a public one: loopback, private (RFC 1918, unique local),
link-local (the cloud metadata address 169.254.169.254 among them), unspecified, multicast, broadcast,
reserved, shared address space (CGNAT, 100.64.0.0/10), documentation and benchmarking ranges, the IETF
protocol block, Teredo, NAT64 local use, site-local; an IPv6 address that carries an IPv4 one
(IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) is judged by the IPv4
address it carries. The lists are written out here rather than read from :mod:`ipaddress`'s
``is_global``, which in Python 3.11 calls multicast, site-local and 6to4-of-loopback addresses global.

:class:`AddressGuard` applies it where the connection is made: :class:`GuardedBackend` is the network
backend of an ``httpx`` transport (:meth:`AddressGuard.transport`); each new connection resolves the
host name once, refuses it when any address it resolves to is refused (:class:`AddressRefused`), and
connects to an address it checked (never a second resolution that a DNS-rebinding server could answer
differently). Every redirect hop to another host opens a new connection, so every hop is checked.
TLS still verifies the certificate against the host name. Proxies from the environment are not used
under the guard (through a proxy, the address connected to would be the proxy's).

Importing this module loads nothing but the standard library (httpx and httpcore are loaded when a
transport is made).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``(host, port) -> addresses`` (text), awaited; the default asks the system (``getaddrinfo``).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
#: ``address -> why it is refused`` (None: allowed).
Policy = Callable[[IPAddress], "str | None"]
#: How every refusal's reason starts (``phiclip.fetch`` passes it on as the failure's reason).
REFUSED = "refused (not a public address)"

_V4 = [(ipaddress.ip_network(net), why) for net, why in (
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address (RFC 1918)"),
    ("100.64.0.0/10", "a shared address (carrier-grade NAT, 100.64.0.0/10)"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address (e.g. a cloud metadata service)"),
    ("172.16.0.0/12", "a private address (RFC 1918)"),
    ("192.0.0.0/24", "an IETF protocol address (192.0.0.0/24)"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address (RFC 1918)"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),  # 255.255.255.255 (broadcast) included
)]
_V6 = [(ipaddress.ip_network(net), why) for net, why in (
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/32", "a Teredo tunnel address"),
    ("2001:db8::/32", "a documentation address"),
    ("fc00::/7", "a private address (unique local)"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
    ("::/8", "a reserved address (IPv4-compatible and other ::/8 forms)"),
)]
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refusal(address: IPAddress | str) -> str | None:
    """Why ``address`` is not a public address a server should fetch from (``"a loopback address"``...),
    or None when it is one. An IPv6 address carrying an IPv4 one is judged by that one."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        carried = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if carried is not None:
            why = refusal(carried)
            form = "IPv4-mapped" if ip in _MAPPED else "6to4" if ip.sixtofour else "NAT64"
            return None if why is None else f"{why}, in its {form} IPv6 form ({carried})"
        table = _V6
    else:
        table = _V4
    for net, why in table:
        if ip in net:
            return why
    if not ip.is_global:
        return "not a globally routable address"
    return None


class AddressRefused(Exception):
    """A connection the guard refused: ``host`` resolved to ``address``, which is not public (``why``)."""

    def __init__(self, host: str, address: str, why: str) -> None:
        self.host, self.address, self.why = host, address, why
        shown = f"{address} is" if host == address else f"{host} resolves to {address},"
        super().__init__(f"{REFUSED}: {shown} {why}")


def is_refusal(reason: str) -> bool:
    """Whether a fetch failure's reason is the guard's refusal."""
    return reason.startswith(REFUSED)


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system resolves ``host`` to (``getaddrinfo``; an IP address gives itself)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class AddressGuard:
    """Which addresses may be connected to (``policy``, default :func:`refusal`) and how host names are
    resolved (``resolver``, default the system's). Hashable: part of :class:`phiclip.fetch.FetchOptions`."""

    policy: Policy = refusal
    resolver: Resolver = system_resolver

    async def resolve(self, host: str, port: int) -> list[str]:
        """``host``'s addresses, every one of them allowed; raises :class:`AddressRefused` otherwise (a
        name that resolves to a public and a private address is refused: one answer may be a trap)."""
        found = list(dict.fromkeys(a.split("%", 1)[0] for a in await self.resolver(host, port)))
        if not found:
            raise OSError(f"{host} resolves to no address")
        for address in found:
            why = self.policy(ipaddress.ip_address(address))
            if why is not None:
                raise AddressRefused(host, address, why)
        return found

    def transport(self, **settings: Any) -> Any:
        """An ``httpx.AsyncHTTPTransport`` (``settings``: its keyword arguments, e.g. ``limits``) whose
        every connection goes through :class:`GuardedBackend`; proxies from the environment unused."""
        import httpx

        transport = httpx.AsyncHTTPTransport(trust_env=False, **settings)
        pool = getattr(transport, "_pool", None)
        if pool is None or not hasattr(pool, "_network_backend") or type(pool).__name__ != "AsyncConnectionPool":
            # fail closed: without the backend in place, the guard would check nothing
            raise RuntimeError(f"this httpx ({httpx.__version__}) does not build its transport the way the address "
                               "guard expects; cannot fetch URLs safely (pin httpx < 1 and httpcore 1.x)")
        pool._network_backend = GuardedBackend(pool._network_backend, self)
        return transport


class GuardedBackend:
    """An httpcore network backend that resolves each host once, checks every address
    (:meth:`AddressGuard.resolve`), and connects ``inner`` to the checked addresses only."""

    def __init__(self, inner: Any, guard: AddressGuard) -> None:
        self.inner = inner
        self.guard = guard

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Any = None) -> Any:
        """Resolve ``host`` (within ``timeout``), refuse it or connect to its first address that answers."""
        import httpcore

        try:
            addresses = await asyncio.wait_for(self.guard.resolve(host, port), timeout)
        except asyncio.TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} took over {timeout} s") from None
        except OSError as e:
            raise httpcore.ConnectError(f"cannot resolve {host} ({e})") from None
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        assert error is not None
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        """Refused: a Unix socket is this machine."""
        raise AddressRefused(path, path, "a Unix socket on this machine")

    async def sleep(self, seconds: float) -> None:
        """As the inner backend sleeps."""
        await self.inner.sleep(seconds)


__all__ = ["REFUSED", "AddressGuard", "AddressRefused", "GuardedBackend", "Policy", "Resolver", "is_refusal",
           "refusal", "system_resolver"]
