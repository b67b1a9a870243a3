"""Download a query image from a URL (clip-retrieval's `image_url`) without becoming an SSRF proxy.

Off unless `DUET_IMAGE_URL_FETCH=true`. Then: http and https only; the host is resolved and
*every* address must be public (no private, loopback, link-local, multicast, reserved or
unspecified ones), and the connection goes to an address that was checked — not to a second
resolution, which a rebinding DNS server could point elsewhere. Redirects are followed by hand
(at most `MAX_REDIRECTS`), each target checked the same way. The body is read up to the byte
limit and the whole download — connect, headers, every redirect and the body — must finish
within the time limit: each step gets the time that is left, and the body is checked against the
deadline at every piece that arrives, so a server trickling a byte at a time cannot stretch it.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit

import httpx

MAX_REDIRECTS = 3


class FetchError(Exception):
    """An image_url that may not or could not be fetched; `status` is the HTTP status to answer."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; IPv4-mapped IPv6 is judged as IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def public_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, if all are public; else `FetchError` (400)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(400, "bad_request", f"image_url host {host!r} does not resolve") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [a for a in addresses if not is_public_address(a)]
    if refused or not addresses:
        raise FetchError(
            400,
            "bad_request",
            f"image_url host {host!r} resolves to non-public addresses ({', '.join(refused)}); "
            "only public hosts may be fetched",
        )
    return addresses


def fetch_image(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """The bytes at `url` (see module doc); `FetchError` with a 4xx status when refused."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            request = _pinned_request(client, url, _time_left(deadline))
            try:
                response = client.send(request, stream=True)
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
                return _read_limited(response, max_bytes, deadline)
            finally:
                response.close()
    raise FetchError(400, "bad_request", f"image_url redirected more than {MAX_REDIRECTS} times")


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(400, "bad_request", "image_url took too long to download")
    return left


def _pinned_request(client: httpx.Client, url: str, timeout_s: float) -> httpx.Request:
    """A GET of `url` sent to a checked address of its host (Host header and TLS name kept)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)  # ValueError if not 0-65535
        url_object = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise FetchError(400, "bad_request", f"image_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(400, "bad_request", "image_url must be an http:// or https:// URL")
    address = public_addresses(parts.hostname, port)[0].split("%", 1)[0]
    pinned = url_object.copy_with(host=address)
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return client.build_request(
        "GET",
        pinned,
        headers={"Host": host_header, "Accept": "image/*"},
        extensions={"sni_hostname": parts.hostname},
        timeout=timeout_s,
    )


def _read_limited(response: httpx.Response, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(
            413, "too_large", f"image_url is {declared} bytes; the limit is {max_bytes}"
        )
    chunks: list[bytes] = []
    received = 0
    try:
        for chunk in response.iter_bytes():  # as each piece arrives, not once 64 KiB have
            received += len(chunk)
            if received > max_bytes:
                raise FetchError(
                    413, "too_large", f"image_url is over the limit of {max_bytes} bytes"
                )
            if time.monotonic() > deadline:
                raise FetchError(400, "bad_request", "image_url took too long to download")
            chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise FetchError(400, "bad_request", f"image_url could not be fetched: {exc}") from exc
    return b"".join(chunks)
