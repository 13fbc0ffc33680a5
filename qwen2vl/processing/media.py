"""Fetching images and videos from where users point: PIL images, numpy arrays, torch tensors, paths, file://,
data: URIs, http(s).

Matches the sources qwen-vl-utils' `fetch_image` / `fetch_video` accept, with explicit limits it lacks: a time
limit, a byte cap and a redirect cap for URLs, a decompression-bomb pixel cap, and (for servers) a directory that
file:// and paths must stay inside, an allow-list of domains, and refusal of loopback, private and link-local
addresses. Every failure is an `InputError` naming the item.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .image import array_to_image


@dataclass(frozen=True)
class MediaPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 64 * 2**20
    max_redirects: int = 3
    max_image_pixels: int = 64_000_000  # decompression-bomb cap on the decoded image
    allow_http: bool = True
    allow_private_addresses: bool = True  # servers set False: no loopback/private/link-local targets
    allowed_domains: tuple[str, ...] | None = None  # None: any
    local_root: Path | None = None  # when set, paths and file:// must resolve inside it
    allow_local: bool = True


def describe(source) -> str:
    if isinstance(source, str):
        return source if len(source) < 80 else source[:60] + "..."
    return type(source).__name__


def read_bytes(source: str, policy: MediaPolicy, what: str) -> bytes:
    """The bytes behind a path, file:// URL, data: URI or http(s) URL, within the policy's limits."""
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise InputError("only base64 data: URIs are supported", what)
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"invalid base64 payload ({e})", what) from None
        if len(data) > policy.max_bytes:
            raise InputError(f"{len(data)} bytes exceed the limit of {policy.max_bytes}", what)
        return data
    if source.startswith(("http://", "https://")):
        return _http_get(source, policy, what)
    path = Path(source[7:] if source.startswith("file://") else source)
    return local_path(path, policy, what).read_bytes()


def local_path(path: Path, policy: MediaPolicy, what: str) -> Path:
    if not policy.allow_local:
        raise InputError("local files are not accepted here", what)
    resolved = path.expanduser().resolve()
    if policy.local_root is not None and not resolved.is_relative_to(Path(policy.local_root).resolve()):
        raise InputError(f"{path} is outside the allowed media directory {policy.local_root}", what)
    if not resolved.is_file():
        raise InputError(f"no such file: {path}", what)
    if resolved.stat().st_size > policy.max_bytes:
        raise InputError(f"file is {resolved.stat().st_size} bytes, over the limit of {policy.max_bytes}", what)
    return resolved


def _check_host(url: str, policy: MediaPolicy, what: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    if policy.allowed_domains is not None and not any(host == d or host.endswith("." + d) for d in policy.allowed_domains):
        raise InputError(f"host {host!r} is not among the allowed media domains", what)
    if not policy.allow_private_addresses:
        try:
            infos = socket.getaddrinfo(host, None)
        except socket.gaierror as e:
            raise InputError(f"cannot resolve {host!r} ({e})", what) from None
        for info in infos:
            addr = ipaddress.ip_address(info[4][0])
            if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast:
                raise InputError(f"host {host!r} resolves to a non-public address ({addr})", what)


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: MediaPolicy, what: str) -> None:
        self.policy, self.what, self.count = policy, what, 0

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.count += 1
        if self.count > self.policy.max_redirects:
            raise InputError(f"more than {self.policy.max_redirects} redirects", self.what)
        _check_host(newurl, self.policy, self.what)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_get(url: str, policy: MediaPolicy, what: str) -> bytes:
    if not policy.allow_http:
        raise InputError("URLs are not accepted here", what)
    _check_host(url, policy, what)
    opener = urllib.request.build_opener(_LimitedRedirects(policy, what))
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "qwen2vl"}), timeout=policy.timeout_s) as r:
            length = r.headers.get("Content-Length")
            if length and int(length) > policy.max_bytes:
                raise InputError(f"{length} bytes exceed the limit of {policy.max_bytes}", what)
            data = r.read(policy.max_bytes + 1)
    except InputError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InputError(f"could not fetch {url} ({getattr(e, 'reason', e)})", what) from None
    if len(data) > policy.max_bytes:
        raise InputError(f"response exceeds the limit of {policy.max_bytes} bytes", what)
    return data


def load_image(source, policy: MediaPolicy, what: str = "image") -> Image.Image:
    """A fully decoded PIL image (any mode) from any supported source; arrays and tensors as `array_to_image`."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        image = array_to_image(source, what)
    elif isinstance(source, (str, Path)):
        data = read_bytes(str(source), policy, what)
        image = _decode(data, policy, what)
    else:
        raise InputError(f"unsupported image source of type {type(source).__name__}", what)
    w, h = image.size
    if w * h > policy.max_image_pixels:
        raise InputError(f"{w}x{h} = {w * h} pixels exceed the limit of {policy.max_image_pixels}", what)
    return image


def _decode(data: bytes, policy: MediaPolicy, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise InputError("not a recognised image format", what) from None
    w, h = image.size
    if w * h > policy.max_image_pixels:  # checked before decoding the pixels
        raise InputError(f"{w}x{h} = {w * h} pixels exceed the limit of {policy.max_image_pixels}", what)
    try:
        image.load()
    except (OSError, SyntaxError) as e:
        raise InputError(f"undecodable or truncated image ({e})", what) from None
    return image
