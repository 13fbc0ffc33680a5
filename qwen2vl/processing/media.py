"""Fetching images and videos from where users point: PIL images, numpy arrays, torch tensors, paths, file://,
data: URIs, http(s).

Matches the sources qwen-vl-utils' `fetch_image` / `fetch_video` accept, with explicit limits it lacks: a time
limit over a whole fetch, a byte cap and a redirect cap for URLs, a decompression-bomb pixel cap, and (for servers)
a directory that file:// and paths must stay inside, an allow-list of domains, and refusal of any address that is
not globally routable. A URL's host is resolved once per hop and the connection goes to the address that was
checked, so the name cannot answer differently in between (DNS rebinding). Every failure is an `InputError`
naming the item.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .image import array_to_image


@dataclass(frozen=True)
class MediaPolicy:
    timeout_s: float = 10.0  # for a whole URL fetch, redirects included
    max_bytes: int = 64 * 2**20
    max_redirects: int = 3
    max_image_pixels: int = 64_000_000  # decompression-bomb cap on the decoded image
    allow_http: bool = True
    allow_private_addresses: bool = True  # servers set False: only globally routable addresses
    allowed_domains: tuple[str, ...] | None = None  # None: any
    local_root: Path | None = None  # when set, paths and file:// must resolve inside it
    allow_local: bool = True


@dataclass(frozen=True)
class Fetched:
    """The bytes behind a URL or data: URI, fetched once so that planning and decoding read the same copy."""

    source: str
    data: bytes = field(repr=False)


def fetch(source, policy: MediaPolicy, what: str):
    """URL and data: sources (and lists of them, a video's frames) as `Fetched`; anything else unchanged."""
    if isinstance(source, list):
        return [fetch(s, policy, f"{what} frame {i}") for i, s in enumerate(source)]
    if isinstance(source, str) and source.startswith(("http://", "https://", "data:")):
        return Fetched(source, read_bytes(source, policy, what))
    return source


def describe(source) -> str:
    """A short name for a media source in messages: a long path or URL keeps its start and its end."""
    if isinstance(source, Fetched):
        source = source.source
    if isinstance(source, str):
        return source if len(source) <= 60 else source[:40] + "..." + source[-12:]
    if isinstance(source, list):
        return f"{len(source)} frames"
    return type(source).__name__


# -- where the bytes come from -----------------------------------------------------------------------------------

_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def read_bytes(source, policy: MediaPolicy, what: str) -> bytes:
    """The bytes behind a path, file:// URL, data: URI or http(s) URL, within the policy's limits."""
    if isinstance(source, Fetched):
        return source.data
    source = str(source)
    if "\0" in source:  # the OS would stop the name there; refuse rather than guess
        raise InputError("the source contains a NUL byte", what)
    if source[:5].lower() == "data:":
        return _data_uri(source, policy, what)
    scheme = _URL_SCHEME.match(source)
    scheme = scheme.group(1).lower() if scheme else None
    if scheme in ("http", "https"):
        return _http_get(source, policy, what)
    if scheme not in (None, "file"):  # ftp://, gopher://, ... are not local file names either
        raise InputError(f"unsupported URL scheme {scheme!r} (expected http, https, file or data)", what)
    return _read_file(local_path(Path(source[7:] if scheme else source), policy, what), policy, what)


def _data_uri(source: str, policy: MediaPolicy, what: str) -> bytes:
    header, comma, payload = source[5:].partition(",")
    if not comma:
        raise InputError("data: URI without a ',' before its payload", what)
    if not header.lower().endswith(";base64"):
        raise InputError("only base64 data: URIs are supported", what)
    if len(payload) // 4 * 3 > policy.max_bytes:  # 4 base64 characters carry 3 bytes: refuse before decoding
        raise InputError(
            f"base64 payload of about {len(payload) // 4 * 3} bytes exceeds the limit of {policy.max_bytes}", what
        )
    try:  # validate: characters outside the alphabet are an error, not silently dropped; line breaks are fine
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"data: URI payload is not valid base64 ({e})", what) from None


def local_path(path: Path, policy: MediaPolicy, what: str) -> Path:
    """The regular file `path` names, symlinks resolved, inside `policy.local_root` when that is set."""
    if not policy.allow_local:
        raise InputError("local files are not accepted here", what)
    name = describe(str(path))
    try:  # resolving follows symlinks, so the root check below sees where a link really points
        resolved = path.expanduser().resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: unknown ~user, or a symlink loop (Python 3.11)
        raise InputError(f"cannot resolve {name} ({e})", what) from None
    if policy.local_root is not None and not resolved.is_relative_to(Path(policy.local_root).resolve()):
        raise InputError(f"{name} is outside the allowed media directory {policy.local_root}", what)
    try:
        st = resolved.stat()
    except FileNotFoundError:
        raise InputError(f"no such file: {name}", what) from None
    except OSError as e:  # name too long, permission denied on a parent, ...
        raise InputError(f"cannot read {name} ({e.strerror or e})", what) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{name} is a directory, not a file", what)
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader, a device may never end
        raise InputError(f"{name} is not a regular file", what)
    if st.st_size > policy.max_bytes:
        raise InputError(f"file is {st.st_size} bytes, over the limit of {policy.max_bytes}", what)
    return resolved


def _read_file(path: Path, policy: MediaPolicy, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)  # bounded even if the file grew after local_path's size check
    except OSError as e:
        raise InputError(f"cannot read {describe(str(path))} ({e.strerror or e})", what) from None
    if len(data) > policy.max_bytes:
        raise InputError(f"file is over the limit of {policy.max_bytes} bytes", what)
    return data


# -- http(s) -----------------------------------------------------------------------------------------------------

_REDIRECTS = (301, 302, 303, 307, 308)
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # after IDNA encoding; underscores occur in real names
# IPv6 ranges whose last 32 bits are an IPv4 address the packet ends up at: judge that address instead
_IPV4_INSIDE_IPV6 = (
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64
    ipaddress.IPv6Network("::/96"),
)  # IPv4-compatible (deprecated, still routable on some hosts)


@dataclass(frozen=True)
class _Url:
    https: bool
    host: str  # lower-case ASCII name (IDNA) or IP literal without brackets
    port: int
    target: str  # path and query as sent in the request line, percent-encoded


def _parse_url(url: str, what: str) -> _Url:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises for a port that is not a number or out of range
    except ValueError as e:
        raise InputError(f"invalid URL {describe(url)} ({e})", what) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InputError(f"unsupported URL scheme {scheme!r} (expected http or https)", what)
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InputError(f"URL {describe(url)} has no host", what)
    if port == 0:
        raise InputError(f"URL {describe(url)} has port 0", what)
    try:
        if ":" in host:
            ipaddress.IPv6Address(host)
        else:
            host = host.encode("idna").decode("ascii")  # also refuses empty and over-long labels
            if not _HOST_NAME.fullmatch(host):
                raise UnicodeError("characters not allowed in a host name")
    except (UnicodeError, ValueError) as e:
        raise InputError(f"invalid host {host!r} in URL ({e})", what) from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = urllib.parse.quote(target, safe="!#$%&'()*+,/:;=?@[]~")  # spaces, non-ASCII: encoded, not refused
    return _Url(scheme == "https", host, port or (443 if scheme == "https" else 80), target)


def _is_public(address: str) -> bool:
    addr = ipaddress.ip_address(address)
    if addr.version == 6:
        if addr.sixtofour is not None:  # 6to4 reaches the embedded IPv4 address
            addr = addr.sixtofour
        elif any(addr in net for net in _IPV4_INSIDE_IPV6):
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFF_FFFF)
    # is_global excludes loopback, private, link-local, shared (CGNAT 100.64/10), reserved and documentation ranges
    return addr.is_global and not addr.is_multicast


def _check_host(url: _Url, policy: MediaPolicy, what: str) -> list[tuple]:
    """Resolve the host once and check every address; the fetch connects only to the addresses returned."""
    host = url.host
    if policy.allowed_domains is not None:
        allowed = [d.lower().rstrip(".") for d in policy.allowed_domains]
        if not any(host == d or host.endswith("." + d) for d in allowed):
            raise InputError(f"host {host!r} is not among the allowed media domains", what)
    try:
        infos = socket.getaddrinfo(host, url.port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InputError(f"cannot resolve {host!r} ({e})", what) from None
    if not policy.allow_private_addresses:
        for *_, sockaddr in infos:
            if not _is_public(sockaddr[0]):
                raise InputError(f"host {host!r} resolves to a non-public address ({sockaddr[0]})", what)
    return infos


def _arm(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("time limit reached")
    sock.settimeout(left)  # a connect, sendall, TLS handshake or receive: each bounded as a whole by this


class _DeadlineReader(io.RawIOBase):
    """What http.client's response reads the socket through: every receive gets only the time left before the
    fetch's deadline. A plain socket timeout restarts with each byte, so a server trickling bytes would stretch a
    fetch without end."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock, self.deadline = sock, deadline
        self.raw = sock.makefile("rb", buffering=0)  # keeps the socket open until the body is read, as usual

    def makefile(self, mode: str) -> io.BufferedReader:  # HTTPResponse reads through sock.makefile("rb")
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        _arm(self.sock, self.deadline)
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


@cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # verifies the certificate chain and the host name


class _PinnedConnection(http.client.HTTPConnection):
    """One request to one of the addresses `_check_host` approved, never to a fresh lookup of the name. The Host
    header, the TLS server name (SNI) and certificate verification still use the name from the URL. Every socket
    operation is bounded by the fetch's deadline."""

    def __init__(self, url: _Url, addresses: list[tuple], deadline: float) -> None:
        super().__init__(url.host, url.port)
        self.default_port = 443 if url.https else 80  # Host: carries the port only when it is not the default
        self.tls, self.addresses, self.deadline = url.https, addresses, deadline

    def connect(self) -> None:
        error: OSError = ConnectionError("no address to connect to")
        for family, kind, proto, _, sockaddr in self.addresses:
            sock = socket.socket(family, kind, proto)
            try:
                _arm(sock, self.deadline)
                sock.connect(sockaddr)
                if self.tls:
                    _arm(sock, self.deadline)
                    sock = _tls_context().wrap_socket(sock, server_hostname=self.host)
                self.sock = sock
                return
            except OSError as e:
                sock.close()
                error = e
        raise error

    def send(self, data) -> None:
        if self.sock is not None:
            _arm(self.sock, self.deadline)
        super().send(data)

    def response_class(self, sock, *args, **kwargs) -> http.client.HTTPResponse:  # getresponse() calls this
        return http.client.HTTPResponse(_DeadlineReader(sock, self.deadline), *args, **kwargs)


def _http_get(url: str, policy: MediaPolicy, what: str) -> bytes:
    if not policy.allow_http:
        raise InputError("URLs are not accepted here", what)
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        location, body = _fetch_once(url, policy, deadline, what)
        if location is None:
            return body
        url = urllib.parse.urljoin(url, location)  # checked like the first URL on the next hop
    raise InputError(f"more than {policy.max_redirects} redirects", what)


def _fetch_once(url: str, policy: MediaPolicy, deadline: float, what: str) -> tuple[str | None, bytes]:
    """One hop: (the redirect's Location, b"") or (None, the body)."""
    parsed = _parse_url(url, what)
    conn = _PinnedConnection(parsed, _check_host(parsed, policy, what), deadline)
    try:
        # identity: a compressed body would be a second size to bound, and we never asked for one
        conn.request(
            "GET",
            parsed.target,
            headers={"User-Agent": "qwen2vl", "Accept-Encoding": "identity", "Connection": "close"},
        )
        r = conn.getresponse()
        if r.status in _REDIRECTS:
            if not r.getheader("Location"):
                raise InputError(f"redirect ({r.status}) without a Location from {describe(url)}", what)
            return r.getheader("Location"), b""
        if r.status != 200:
            raise InputError(f"could not fetch {describe(url)} (HTTP {r.status} {r.reason})", what)
        encoding = r.getheader("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InputError(f"{describe(url)} sent a {encoding}-encoded body, which was not asked for", what)
        declared = r.length  # None when chunked or absent
        if declared is not None and declared > policy.max_bytes:
            raise InputError(f"{declared} bytes exceed the limit of {policy.max_bytes}", what)
        chunks, size = [], 0
        while chunk := r.read1(64 * 1024):  # read1: a body cut short just ends the loop; worded below
            size += len(chunk)
            if size > policy.max_bytes:
                raise InputError(f"response exceeds the limit of {policy.max_bytes} bytes", what)
            chunks.append(chunk)
        if declared is not None and size < declared:
            raise InputError(f"connection closed after {size} of {declared} bytes", what)
        return None, b"".join(chunks)
    except TimeoutError:
        raise InputError(f"fetching took longer than the limit of {policy.timeout_s} s", what) from None
    except InputError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise InputError(f"could not fetch {describe(url)} ({e})", what) from None
    finally:
        conn.close()


# -- images ------------------------------------------------------------------------------------------------------


def load_image(source, policy: MediaPolicy, what: str = "image") -> Image.Image:
    """A fully decoded PIL image (any mode) from any supported source; arrays and tensors as `array_to_image`."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        image = array_to_image(source, what)
    elif isinstance(source, (str, Path, Fetched)):
        image = _decode(read_bytes(source, policy, what), policy, what)
    else:
        raise InputError(f"unsupported image source of type {type(source).__name__}", what)
    return _within_pixel_cap(image, policy, what)


def open_image(data: bytes, policy: MediaPolicy, what: str) -> Image.Image:
    """The image's header (size and mode), pixels not yet decoded, within the policy's pixel cap."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise InputError("not a recognised image format", what) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning under -W error
        raise InputError(f"refused as a decompression bomb ({e})", what) from None
    except Exception as e:  # plugins raise many types on hostile headers (OSError, ValueError, SyntaxError, ...)
        raise InputError(f"unreadable image header ({e})", what) from None
    return _within_pixel_cap(image, policy, what)  # before any pixel is decoded


def _within_pixel_cap(image: Image.Image, policy: MediaPolicy, what: str) -> Image.Image:
    w, h = image.size
    if w * h > policy.max_image_pixels:
        raise InputError(f"{w}x{h} = {w * h} pixels exceed the limit of {policy.max_image_pixels}", what)
    return image


def _decode(data: bytes, policy: MediaPolicy, what: str) -> Image.Image:
    image = open_image(data, policy, what)
    try:
        image.load()
    except Exception as e:  # as above: a decoder meeting hostile data may raise nearly anything
        raise InputError(f"undecodable or truncated image ({e})", what) from None
    return image
