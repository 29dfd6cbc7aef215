"""The address guard (phiclip.netguard) on its own, and inside phiclip.fetch.

No test here sends a packet beyond this machine, even if the guard had a bug: the ranges other than
loopback are exercised through :func:`refusal` and through :class:`GuardedBackend` with a stub resolver
and a stub inner backend that records what it was asked and connects nothing; the live requests go to
servers on loopback addresses only, under the ``loopback_only`` tripwire (tests/conftest.py), which
refuses to resolve any other name or to connect anywhere else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator

import httpcore
import pytest
from inputs._http import FaultServer, jpeg

from phiclip.fetch import FetchOptions, fetch_many
from phiclip.netguard import REFUSED, AddressGuard, AddressRefused, GuardedBackend, is_refusal, refusal

REFUSED_ADDRESSES = {
    "127.0.0.1": "loopback", "127.255.255.254": "loopback", "10.1.2.3": "private", "172.16.0.1": "private",
    "172.31.255.255": "private", "192.168.1.1": "private", "169.254.169.254": "link-local",
    "0.0.0.0": "unspecified", "0.1.2.3": "unspecified", "100.64.0.1": "carrier-grade NAT",
    "100.127.255.255": "carrier-grade NAT", "224.0.0.1": "multicast", "239.255.255.250": "multicast",
    "240.0.0.1": "reserved", "255.255.255.255": "reserved", "192.0.0.8": "IETF protocol",
    "192.0.2.1": "documentation", "198.51.100.7": "documentation", "203.0.113.9": "documentation",
    "198.18.0.1": "benchmarking", "192.88.99.1": "6to4 relay",
    "::": "unspecified", "::1": "loopback", "fe80::1": "link-local", "fe80::1%2": "link-local",
    "fc00::1": "unique local", "fd12:3456::1": "unique local", "fec0::1": "site-local", "ff02::1": "multicast",
    "::ffff:127.0.0.1": "loopback address, in its IPv4-mapped", "::ffff:10.0.0.1": "(RFC 1918), in its IPv4-mapped",
    "::ffff:169.254.169.254": "link-local", "::ffff:0.0.0.0": "unspecified",
    "2002:7f00:1::1": "loopback address, in its 6to4", "2002:a9fe:a9fe::": "link-local", "64:ff9b::7f00:1": "loopback address, in its NAT64",
    "64:ff9b::a00:1": "private", "64:ff9b:1::1": "local-use NAT64", "::7f00:1": "reserved", "100::1": "discard-only",
    "2001:db8::1": "documentation", "2001:0:4136:e378::1": "Teredo",
}
PUBLIC_ADDRESSES = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.128.0.1", "100.63.255.255", "172.32.0.1",
                    "11.0.0.1", "192.169.0.1", "2606:4700:4700::1111", "2a00:1450:4001::200e", "::ffff:8.8.8.8",
                    "2002:808:808::1", "64:ff9b::808:808"]


@pytest.mark.parametrize("address, why", sorted(REFUSED_ADDRESSES.items()))
def test_non_public_addresses_are_refused_with_their_reason(address: str, why: str) -> None:
    reason = refusal(address)
    assert reason is not None and why in reason, (address, reason)
    assert refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(address) is None


class StubResolver:
    """Resolves from a table; counts its calls."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(f"{host}: unknown in the stub")
        return self.table[host]


class StubBackend:
    """An httpcore backend that connects nothing: it records the address it was asked for."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, **kw: object) -> str:
        self.connects.append((host, port))
        return f"stream to {host}:{port}"

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _connect(guard: AddressGuard, host: str, port: int = 80) -> tuple[object, StubBackend]:
    inner = StubBackend()
    backend = GuardedBackend(inner, guard)

    async def go() -> object:
        return await backend.connect_tcp(host, port, timeout=2)

    try:
        return asyncio.run(go()), inner
    except Exception as e:  # noqa: BLE001 - returned to the test
        return e, inner


@pytest.mark.parametrize("answer", [["10.0.0.7"], ["169.254.169.254"], ["100.100.100.200"], ["fd00::1"],
                                    ["::ffff:192.168.0.1"], ["93.184.216.34", "10.0.0.7"]])
def test_a_name_resolving_to_any_non_public_address_is_refused_before_connecting(answer: list[str]) -> None:
    resolver = StubResolver({"images.example": answer})
    got, inner = _connect(AddressGuard(resolver=resolver), "images.example")
    assert isinstance(got, AddressRefused) and is_refusal(str(got)), got
    assert str(got).startswith(f"{REFUSED}: images.example resolves to ")
    assert inner.connects == []  # nothing was connected
    assert resolver.calls == ["images.example"]


def test_a_public_name_is_connected_to_the_address_that_was_checked() -> None:
    # DNS rebinding: a second resolution could answer 127.0.0.1; the backend connects to the checked address
    resolver = StubResolver({"images.example": ["93.184.216.34", "2606:2800:220:1::248"]})
    got, inner = _connect(AddressGuard(resolver=resolver), "images.example", 443)
    assert got == "stream to 93.184.216.34:443"
    assert inner.connects == [("93.184.216.34", 443)] and resolver.calls == ["images.example"]


def test_resolver_failures_and_unix_sockets() -> None:
    got, inner = _connect(AddressGuard(resolver=StubResolver({})), "nowhere.example")
    assert isinstance(got, httpcore.ConnectError) and "cannot resolve nowhere.example" in str(got)
    got, _ = _connect(AddressGuard(resolver=StubResolver({"empty.example": []})), "empty.example")
    assert isinstance(got, httpcore.ConnectError) and "resolves to no address" in str(got)

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["93.184.216.34"]

    inner = StubBackend()

    async def go() -> object:
        try:
            return await GuardedBackend(inner, AddressGuard(resolver=slow)).connect_tcp("slow.example", 80, timeout=0.1)
        except Exception as e:  # noqa: BLE001
            return e

    assert isinstance(asyncio.run(go()), httpcore.ConnectTimeout) and inner.connects == []

    async def unix() -> object:
        try:
            return await GuardedBackend(inner, AddressGuard()).connect_unix_socket("/run/docker.sock")
        except AddressRefused as e:
            return e

    assert isinstance(asyncio.run(unix()), AddressRefused)


# --- live, loopback only -------------------------------------------------------------------------

GUARDED = FetchOptions(guard=AddressGuard(), retries=0, connect_timeout=2, read_timeout=2, deadline=4)


@pytest.fixture()
def server() -> Iterator[FaultServer]:
    s = FaultServer()
    try:
        yield s
    finally:
        s.close()


def test_loopback_urls_are_refused_and_never_reached(loopback_only: list[str], server: FaultServer) -> None:
    port = server.httpd.server_address[1]
    urls = [server.url("/img/a.jpg"), f"http://localhost:{port}/img/a.jpg", f"http://[::1]:{port}/img/a.jpg",
            f"http://127.1.2.3:{port}/img/a.jpg", f"http://2130706433:{port}/img/a.jpg",
            f"http://[::ffff:127.0.0.1]:{port}/img/a.jpg"]
    got = fetch_many(urls, GUARDED)
    for url, body in zip(urls, got):
        assert not isinstance(body, bytes) and is_refusal(body.reason), (url, body)
        assert "loopback address" in body.reason
    assert "localhost resolves to" in got[1].reason
    assert server.hits == {} and loopback_only == []
    # without the guard (--allow-private-urls), the same fetcher reaches it
    assert fetch_many([server.url("/img/a.jpg")], FetchOptions(retries=0, trust_env=False)) == [jpeg("a.jpg")]


def test_every_redirect_hop_is_checked(loopback_only: list[str], server: FaultServer) -> None:
    # a policy that lets 127.0.0.1 through (standing in for a public address) and refuses the rest
    first_only = FetchOptions(guard=AddressGuard(policy=lambda ip: None if str(ip) == "127.0.0.1" else refusal(ip)),
                              retries=0, connect_timeout=2, read_timeout=2, deadline=4)
    other = FaultServer(host="127.0.0.2")
    try:
        port = other.httpd.server_address[1]
        hops = [other.url("/img/b.jpg"), f"http://127.0.0.3:{port}/img/b.jpg", f"http://[::1]:{port}/img/b.jpg"]
        urls = [server.url("/redirect?to=" + hop) for hop in hops]
        got = fetch_many(urls + [server.url("/img/a.jpg")], first_only)
        assert got[-1] == jpeg("a.jpg")  # the allowed address itself is fetched
        for hop, body in zip(hops, got):
            assert not isinstance(body, bytes) and is_refusal(body.reason), (hop, body)
        assert "127.0.0.2 is a loopback address" in got[0].reason
        assert other.hits == {} and server.hits["/redirect"] == 3
        # a redirect between two allowed addresses is followed
        both = FetchOptions(guard=AddressGuard(policy=lambda ip: None), retries=0)
        assert fetch_many([server.url("/redirect?to=" + other.url("/img/b.jpg"))], both) == [jpeg("b.jpg")]
    finally:
        other.close()
    assert loopback_only == []


def test_the_connection_goes_to_the_resolved_address_without_a_second_lookup(loopback_only: list[str]) -> None:
    # the stub makes "localhost" resolve to 127.0.0.2, where the server is; the system resolver would
    # answer 127.0.0.1 (nothing listens on that port there), so reaching the server proves one lookup
    server = FaultServer(host="127.0.0.2")
    try:
        port = server.httpd.server_address[1]
        resolver = StubResolver({"localhost": ["127.0.0.2"]})
        opts = FetchOptions(guard=AddressGuard(policy=lambda ip: None, resolver=resolver), retries=0)
        assert fetch_many([f"http://localhost:{port}/img/c.jpg"], opts) == [jpeg("c.jpg")]
        assert resolver.calls == ["localhost"]
        assert server.seen_hosts == [f"localhost:{port}"]  # the Host header still names the host
    finally:
        server.close()
    assert loopback_only == []


def test_the_tripwire_stops_traffic_off_this_machine(loopback_only: list[str]) -> None:
    # the guard of these tests' own safety net: a resolution or a connection beyond loopback raises
    with pytest.raises(AssertionError, match="resolve"):
        socket.getaddrinfo("example.com", 80)
    s = socket.socket()
    try:
        with pytest.raises(AssertionError, match="connect"):
            s.connect(("192.0.2.1", 9))  # a documentation address: would go nowhere anyway
    finally:
        s.close()
    assert len(loopback_only) == 2
    loopback_only.clear()
