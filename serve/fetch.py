"""Download a query image from a URL (clip-retrieval's `image_url`) without becoming an SSRF proxy.

Off unless `DUET_IMAGE_URL_FETCH=true`. Then:

- http and https only; the host is resolved and *every* address must be public (no private,
  loopback, link-local, multicast, reserved or unspecified ones; an IPv6 address that embeds an
  IPv4 one — IPv4-mapped, -translated or -compatible, NAT64 `64:ff9b::/96` and
  `64:ff9b:1::/48`, 6to4 `2002::/16`, Teredo `2001::/32` — is judged by the IPv4 addresses it
  carries), or inside one of the networks the operator allows
  (`DUET_IMAGE_URL_ALLOWED_NETWORKS`, none by default);
- the connection goes to an address that was checked — not to a second resolution, which a
  rebinding DNS server could point elsewhere; redirects are followed by hand (at most
  `MAX_REDIRECTS`), each target checked the same way;
- the whole download — name lookup, connect, headers, every redirect and the body — runs on the
  event loop under one deadline: when it passes, the download is cancelled, which closes its
  socket at once (a server dripping its headers a byte at a time holds nothing afterwards);
- the body is counted as it arrives, as sent on the wire, against the byte limit. The request
  asks for `Accept-Encoding: identity`; an answer encoded anyway with gzip or deflate (in any
  number of layers) is decoded by a decompressor that stops at the byte limit, so a small
  compressed bomb costs no more than the limit; any other content coding is refused.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import zlib
from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit

import httpx

MAX_REDIRECTS = 3
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# zlib's window bits per HTTP content coding ("deflate" is the zlib format; raw deflate is tried
# when that fails, as browsers do).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")


class FetchError(Exception):
    """An image_url that may not or could not be fetched; `status` is the HTTP status to answer."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type


def embedded_ipv4s(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address may carry, or none: mapped, translated (SIIT),
    compatible, NAT64 (every RFC 6052 layout the local-use prefix allows), 6to4, Teredo (its
    server and its client)."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _IPV4_TRANSLATED or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # not :: or ::1
        return [ipaddress.IPv4Address(ip.packed[12:])]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if ip in _NAT64_WELL_KNOWN:
        return [_rfc6052_ipv4(ip, 96)]
    if ip in _NAT64_LOCAL_USE:
        return [_rfc6052_ipv4(ip, length) for length in (48, 56, 64, 96)]
    return []


def _rfc6052_ipv4(ip: ipaddress.IPv6Address, prefix_bits: int) -> ipaddress.IPv4Address:
    """The IPv4 address after a `prefix_bits` NAT64 prefix; bits 64-71 (the "u" octet) are
    skipped for prefixes shorter than 96 (RFC 6052, section 2.2)."""
    packed = ip.packed if prefix_bits == 96 else ip.packed[:8] + ip.packed[9:]
    start = prefix_bits // 8
    return ipaddress.IPv4Address(packed[start : start + 4])


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; an IPv6 address that carries an IPv4 one
    is judged by it (by each, where it may carry several)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and (carried := embedded_ipv4s(ip)):
        return all(is_public_address(str(v4)) for v4 in carried)
    return ip.is_global and not ip.is_multicast


def parse_networks(networks: Sequence[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings -> networks (ValueError names the bad one)."""
    return tuple(ipaddress.ip_network(network, strict=False) for network in networks)


def is_allowed_address(address: str, allowed: Sequence[IPNetwork] = ()) -> bool:
    """Public, or inside one of the operator's `allowed` networks."""
    if is_public_address(address):
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return any(ip.version == network.version and ip in network for network in allowed)


async def public_addresses(host: str, port: int, allowed: Sequence[IPNetwork] = ()) -> list[str]:
    """Every address `host` resolves to, if all may be fetched; else `FetchError` (400)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(400, "bad_request", f"image_url host {host!r} does not resolve") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [a for a in addresses if not is_allowed_address(a, allowed)]
    if refused or not addresses:
        raise FetchError(
            400,
            "bad_request",
            f"image_url host {host!r} resolves to non-public addresses ({', '.join(refused)}); "
            "only public hosts may be fetched",
        )
    return addresses


async def fetch_image(
    url: str, *, max_bytes: int, timeout_s: float, allowed: Sequence[IPNetwork] = ()
) -> bytes:
    """The bytes at `url` (see module doc); `FetchError` with a 4xx status when refused."""
    try:
        async with asyncio.timeout(timeout_s):  # cancels the download, closing its socket
            return await _download(url, max_bytes, allowed)
    except TimeoutError:
        raise FetchError(400, "bad_request", "image_url took too long to download") from None


async def _download(url: str, max_bytes: int, allowed: Sequence[IPNetwork]) -> bytes:
    # No client timeout: the caller's deadline covers every step.
    async with httpx.AsyncClient(
        verify=_tls_context(), timeout=None, follow_redirects=False, trust_env=False
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            request = await _pinned_request(client, url, allowed)
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise FetchError(
                    400, "bad_request", f"image_url could not be fetched: {exc}"
                ) from exc
            try:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchError(
                        400, "bad_request", f"image_url answered HTTP {response.status_code}"
                    )
                codings = _content_codings(response)
                data = await _read_limited(response, max_bytes)
            finally:
                await response.aclose()
            return await asyncio.to_thread(decode_content, data, codings, max_bytes)
    raise FetchError(400, "bad_request", f"image_url redirected more than {MAX_REDIRECTS} times")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every download: loading the CA bundle takes tens of ms of CPU."""
    return httpx.create_ssl_context()


async def _pinned_request(
    client: httpx.AsyncClient, url: str, allowed: Sequence[IPNetwork]
) -> httpx.Request:
    """A GET of `url` sent to a checked address of its host (Host header and TLS name kept)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)  # ValueError if not 0-65535
        url_object = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise FetchError(400, "bad_request", f"image_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(400, "bad_request", "image_url must be an http:// or https:// URL")
    address = (await public_addresses(parts.hostname, port, allowed))[0].split("%", 1)[0]
    pinned = url_object.copy_with(host=address)
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return client.build_request(
        "GET",
        pinned,
        headers={"Host": host_header, "Accept": "image/*", "Accept-Encoding": "identity"},
        extensions={"sni_hostname": parts.hostname},
    )


def _content_codings(response: httpx.Response) -> list[str]:
    """The answer's content codings in the order applied; 400 for one this module cannot bound."""
    codings = [
        coding.strip().lower()
        for value in response.headers.get_list("content-encoding")
        for coding in value.split(",")
    ]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    unknown = sorted({coding for coding in codings if coding not in _WBITS})
    if unknown:
        raise FetchError(
            400,
            "bad_request",
            f"image_url answered with Content-Encoding {', '.join(unknown)}; only identity, "
            "gzip and deflate are accepted",
        )
    return codings


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    """The body as sent (not decoded), refused with 413 as soon as it is over `max_bytes`."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(
            413, "too_large", f"image_url is {declared} bytes; the limit is {max_bytes}"
        )
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in response.aiter_raw():  # as each piece arrives
            received += len(chunk)
            if received > max_bytes:
                raise _over_limit(max_bytes)
            chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise FetchError(400, "bad_request", f"image_url could not be fetched: {exc}") from exc
    return b"".join(chunks)


def decode_content(data: bytes, codings: Sequence[str], max_bytes: int) -> bytes:
    """`data` with its content codings undone, last applied first; no step may produce more
    than `max_bytes` (413), so a bomb is stopped after at most that much output."""
    for coding in reversed(codings):
        try:
            data = _inflate(data, _WBITS[coding], max_bytes)
        except zlib.error:
            if coding != "deflate":
                raise FetchError(400, "bad_request", f"image_url: bad {coding} data") from None
            try:
                data = _inflate(data, -zlib.MAX_WBITS, max_bytes)  # raw deflate
            except zlib.error:
                raise FetchError(400, "bad_request", "image_url: bad deflate data") from None
    return data


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, max_bytes + 1)  # stops there, whatever the ratio
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise _over_limit(max_bytes)
    if not inflater.eof or inflater.unused_data:
        raise zlib.error("truncated, or data after the end of the stream")
    return out


def _over_limit(max_bytes: int) -> FetchError:
    return FetchError(413, "too_large", f"image_url is over the limit of {max_bytes} bytes")
