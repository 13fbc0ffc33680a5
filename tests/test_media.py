"""Media fetching against hostile input: DNS rebinding, redirects, slow and oversized responses, odd URLs, paths,
data: URIs, decompression bombs, corrupt images and videos, and video formats that would open other files.

Network: only loopback servers started here. Test host names resolve through a fake `socket.getaddrinfo` (IP
literals are parsed locally, nothing is looked up), and a guard on `socket.socket.connect` refuses every address
but loopback, except a public address a test routes to one of its loopback ports to play a public host.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qwen2vl.processing import InputError, MediaPolicy, media
from qwen2vl.processing.media import load_image, read_bytes

PUBLIC = "93.184.216.34"  # globally routable; never reached: the guard refuses it or routes it to loopback
OPEN = MediaPolicy()  # a library user's default: private addresses allowed
SERVER = MediaPolicy(allow_private_addresses=False)  # a server's


# -- a loopback web server and a fake network ----------------------------------------------------------------------


@pytest.fixture
def web():
    """A loopback HTTP server: `routes` maps a path to a responder; every request is recorded."""
    routes, requests = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append((self.path, self.headers))
            respond = routes.get(self.path)
            if respond is None:
                self.send_error(404)
            else:
                respond(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = server.server_address[1]
    yield SimpleNamespace(
        port=port,
        routes=routes,
        requests=requests,
        server=server,
        paths=lambda: [p for p, _ in requests],
        url=lambda path, host="127.0.0.1": f"http://{host}:{port}{path}",
    )
    server.shutdown()
    server.server_close()


@pytest.fixture
def net(monkeypatch):
    """`answers[name]`: one answer per lookup (an address or a tuple of them), the last repeating. `routes[ip]`: a
    loopback port that plays that address. `lookups` and `refused` record what happened."""
    state = SimpleNamespace(answers={}, routes={}, lookups=[], refused=[])
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host in state.answers:
            seq = state.answers[host]
            answer = seq[min(state.lookups.count(host), len(seq) - 1)]
            state.lookups.append(host)
            return [
                info
                for ip in ((answer,) if isinstance(answer, str) else answer)
                for info in real_getaddrinfo(ip, port, family, type, proto, socket.AI_NUMERICHOST)
            ]
        # anything else must be a literal: AI_NUMERICHOST parses it without asking any DNS server
        return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    def connect(sock, address):
        ip = address[0]
        if ip in state.routes:
            address = ("127.0.0.1", state.routes[ip])
        elif not ipaddress.ip_address(ip.split("%")[0]).is_loopback:
            state.refused.append(ip)
            raise ConnectionRefusedError(f"test network: {ip} is not reachable from here")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return state


def body(data: bytes, length: bool = True, headers: dict | None = None):
    def respond(h):
        h.send_response(200)
        if length:
            h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    return respond


def redirect(location: str, code: int = 302):
    def respond(h):
        h.send_response(code)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return respond


def trickle(part: str):
    """A byte every 50 ms for 3 s, in the headers or in the body: no single read ever waits long."""

    def respond(h):
        if part == "body":
            h.send_response(200)
            h.send_header("Content-Length", "100000")
            h.end_headers()
        else:
            h.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        try:
            for _ in range(60):
                h.wfile.write(b"x")
                time.sleep(0.05)
        except OSError:  # the client hung up: what the test wants
            pass

    return respond


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


# -- URLs: DNS rebinding, redirects, the fetch's limits, hosts ----------------------------------------------------


def test_dns_rebinding_cannot_reach_loopback(web, net):
    """The name answers a public address for the check and 127.0.0.1 afterwards. Resolving again to connect (as
    urllib does) would reach loopback; the fetcher resolves once and connects to the address it checked."""
    web.routes["/secret"] = body(b"internal data")
    net.answers["rebind.test"] = [PUBLIC, "127.0.0.1"]
    with pytest.raises(InputError, match="could not fetch"):
        read_bytes(web.url("/secret", "rebind.test"), SERVER, "image 0")
    assert web.requests == []  # loopback never saw a request
    assert net.lookups == ["rebind.test"] and net.refused == [PUBLIC]  # one lookup; the connection went to it


def test_fetch_connects_to_the_checked_address_with_the_original_host(web, net):
    """The checked public address (routed here to the loopback server) is the one connected to, though a second
    lookup would answer a private one; the server sees the URL's host name in Host:."""
    web.routes["/img.png"] = body(PNG)
    net.answers["cdn.test"] = [PUBLIC, "10.9.9.9"]
    net.routes[PUBLIC] = web.port
    assert read_bytes(web.url("/img.png", "cdn.test"), SERVER, "image 0") == PNG
    _, headers = web.requests[0]
    assert headers["Host"] == f"cdn.test:{web.port}" and headers["Accept-Encoding"] == "identity"
    assert net.lookups == ["cdn.test"] and net.refused == []


def test_every_resolved_address_is_checked(web, net):
    web.routes["/img.png"] = body(PNG)
    net.answers["mixed.test"] = [(PUBLIC, "127.0.0.1")]
    net.routes[PUBLIC] = web.port
    with pytest.raises(InputError, match=r"non-public address \(127.0.0.1\)"):
        read_bytes(web.url("/img.png", "mixed.test"), SERVER, "image 0")
    assert web.requests == []


def test_redirects_are_followed_up_to_the_cap(web, net):
    web.routes["/r0"] = body(PNG)
    for n in range(1, 5):
        web.routes[f"/r{n}"] = redirect(f"r{n - 1}" if n % 2 else web.url(f"/r{n - 1}"))  # relative and absolute
    policy = MediaPolicy(max_redirects=3)
    assert read_bytes(web.url("/r3"), policy, "image 0") == PNG
    web.requests.clear()
    with pytest.raises(InputError, match="more than 3 redirects"):
        read_bytes(web.url("/r4"), policy, "image 0")
    assert web.paths() == ["/r4", "/r3", "/r2", "/r1"]  # the fourth redirect is not followed


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/secret",
        "http://internal.test:{port}/secret",
        "http://[::1]:{port}/secret",
        "http://2130706433:{port}/secret",
        "http://cdn.test:{port}/../secret?x=1#frag",
    ],
)
def test_a_redirect_to_a_private_address_is_refused(target, web, net):
    web.routes["/go"] = redirect(target.format(port=web.port))
    web.routes["/secret"] = body(b"internal data")
    net.answers.update({"cdn.test": [PUBLIC, "127.0.0.1"], "internal.test": ["10.1.2.3"]})
    net.routes[PUBLIC] = web.port
    with pytest.raises(InputError, match="non-public"):
        read_bytes(web.url("/go", "cdn.test"), SERVER, "image 0")
    assert web.paths() == ["/go"] and net.refused == []


@pytest.mark.parametrize(
    "location, scheme",
    [("ftp://127.0.0.1/x.png", "ftp"), ("file:///etc/hostname", "file"), ("gopher://127.0.0.1:70/_x", "gopher")],
)
def test_a_redirect_to_another_scheme_is_refused(location, scheme, web, net):
    web.routes["/go"] = redirect(location)
    with pytest.raises(InputError, match=f"unsupported URL scheme '{scheme}'"):
        read_bytes(web.url("/go"), OPEN, "image 0")


@pytest.mark.parametrize("length", [True, False])
def test_an_oversized_body_is_refused(length, web, net):
    web.routes["/big"] = body(b"x" * 5000, length=length)
    match = "5000 bytes exceed the limit of 1000" if length else "response exceeds the limit of 1000 bytes"
    with pytest.raises(InputError, match=match):
        read_bytes(web.url("/big"), MediaPolicy(max_bytes=1000), "image 0")
    assert read_bytes(web.url("/big"), MediaPolicy(max_bytes=5000), "image 0") == b"x" * 5000


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_server_is_cut_off_by_the_total_time_limit(part, web, net):
    web.routes["/slow"] = trickle(part)
    start = time.monotonic()
    with pytest.raises(InputError, match="longer than the limit of 0.5 s"):
        read_bytes(web.url("/slow"), MediaPolicy(timeout_s=0.5), "image 0")
    assert time.monotonic() - start < 1.5


def test_the_time_limit_covers_the_redirects_together(web, net):
    def slow_redirect(h):
        time.sleep(0.2)
        redirect("/slow")(h)

    web.routes["/slow"] = slow_redirect
    start = time.monotonic()
    with pytest.raises(InputError, match="longer than the limit of 0.5 s"):
        read_bytes(web.url("/slow"), MediaPolicy(timeout_s=0.5, max_redirects=20), "image 0")
    assert time.monotonic() - start < 1.5 and len(web.requests) <= 3  # without the shared deadline: 4.2 s


def test_compressed_and_truncated_bodies_are_refused(web, net):
    web.routes["/gz"] = body(zlib.compress(PNG), headers={"Content-Encoding": "gzip"})
    with pytest.raises(InputError, match="gzip-encoded body, which was not asked for"):
        read_bytes(web.url("/gz"), OPEN, "image 0")

    def short(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"x" * 10)

    web.routes["/short"] = short
    with pytest.raises(InputError, match="closed after 10 of 1000 bytes"):
        read_bytes(web.url("/short"), OPEN, "image 0")


def test_https_pins_the_address_but_verifies_the_url_name(tmp_path, monkeypatch, net):
    """Connected to 127.0.0.1, the TLS handshake still sends the URL's name (SNI) and checks the certificate
    against it: a certificate for media.test serves https://media.test and fails https://other.test."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    ca, leaf = _certificates(tmp_path, "media.test")
    client = ssl.create_default_context(cafile=str(ca))
    monkeypatch.setattr(media, "_tls_context", lambda: client)
    seen = []
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(leaf, tmp_path / "leaf.key")
    server_context.sni_callback = lambda sock, name, ctx: seen.append(name)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers["Host"])
            body(PNG)(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = server.server_address[1]
    net.answers.update({"media.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    try:
        assert read_bytes(f"https://media.test:{port}/a.png", OPEN, "image 0") == PNG
        assert seen == ["media.test", f"media.test:{port}"]
        with pytest.raises(InputError, match="could not fetch .*(certificate|hostname)"):
            read_bytes(f"https://other.test:{port}/a.png", OPEN, "image 0")
    finally:
        server.shutdown()
        server.server_close()


def _certificates(d, name):
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test ca")
    openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={name}")
    (d / "san.ext").write_text(f"subjectAltName=DNS:{name}\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    )
    return d / "ca.pem", d / "leaf.pem"


@pytest.mark.parametrize(
    "url, match",
    [
        ("http://127.0.0.1:99999/x.png", "invalid URL"),  # port out of range
        ("http://127.0.0.1:8o/x.png", "invalid URL"),  # port not a number
        ("http://127.0.0.1:0/x.png", "port 0"),
        ("http://[::1/x.png", "invalid URL"),
        ("http://a..b/x.png", "invalid host"),
        ("http://exa mple.com/x.png", "invalid host"),
        ("http://" + "a" * 64 + ".test/x.png", "invalid host"),  # a label over 63 characters
        ("http:///x.png", "has no host"),
        ("https://:443/x.png", "has no host"),
    ],
)
@pytest.mark.parametrize("policy", [OPEN, SERVER], ids=["open", "server"])
def test_bad_urls_are_input_errors(url, match, policy, net):
    with pytest.raises(InputError, match=match):
        read_bytes(url, policy, "image 0")
    assert net.refused == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0177.0.0.1",
        "0x7f.0.0.1",
        "0.0.0.0",
        "0",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.100.100.200",
        "192.0.2.1",
        "224.0.0.1",
        "255.255.255.255",
        "[::1]",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::ffff:a00:1]",
        "[::7f00:1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "[fe80::1]",
        "[fd00::1]",
        "[ff02::1]",
        "cgnat.test",
        "metadata.test",
    ],
)
def test_non_public_hosts_are_refused(host, web, net):
    """Loopback, private, link-local, shared (CGNAT), documentation, multicast and broadcast addresses, written any
    way (decimal, octal, short, IPv6, IPv4 inside IPv6) or reached through a name."""
    net.answers.update({"cgnat.test": ["100.72.0.9"], "metadata.test": ["169.254.169.254"]})
    with pytest.raises(InputError, match="non-public"):
        read_bytes(f"http://{host}:{web.port}/x.png", SERVER, "image 0")
    assert web.requests == [] and net.refused == []


def test_allowed_domains(web, net):
    web.routes["/a.png"] = body(PNG)
    for name in ("media.test", "cdn.media.test", "notmedia.test", "media.test.evil.test"):
        net.answers[name] = ["127.0.0.1"]
    policy = MediaPolicy(allowed_domains=("Media.Test",))
    for host in ("media.test", "cdn.media.test", "MEDIA.test."):  # case and a trailing dot do not matter
        assert read_bytes(web.url("/a.png", host), policy, "image 0") == PNG
    for host in ("notmedia.test", "media.test.evil.test"):
        with pytest.raises(InputError, match="not among the allowed media domains"):
            read_bytes(web.url("/a.png", host), policy, "image 0")


# -- other schemes, paths and data: URIs ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "gopher://127.0.0.1:70/_x", "Dict://127.0.0.1:11211/stat"])
def test_other_url_schemes_are_refused_by_name(url, net):
    """Not taken for a local file name (which a server with local files allowed would then look for)."""
    with pytest.raises(InputError, match=f"unsupported URL scheme '{url.split(':')[0].lower()}'"):
        read_bytes(url, OPEN, "image 0")


def test_scheme_case_does_not_matter(web, net):
    web.routes["/a.png"] = body(PNG)
    assert read_bytes(web.url("/a.png").replace("http://", "HTTP://"), OPEN, "image 0") == PNG


def test_paths_that_are_not_readable_files(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    os.mkfifo(tmp_path / "fifo")
    cases = [
        (f"{tmp_path}/a\0.png", "NUL byte"),
        (f"file://{tmp_path}/a.png\0.txt", "NUL byte"),
        (str(tmp_path), "is a directory"),
        (f"file://{tmp_path}/", "is a directory"),
        (str(tmp_path / ("x" * 300)), "File name too long"),
        ("/".join([str(tmp_path)] + ["d" * 200] * 25), "File name too long"),  # a path over PATH_MAX
        ("~no_such_user_qwen2vl/a.png", "cannot resolve"),
        (str(loop), "cannot resolve"),
        (str(tmp_path / "fifo"), "not a regular file"),  # reading would wait for a writer forever
        ("/dev/zero", "not a regular file"),  # would never end
        (str(tmp_path / "missing.png"), "no such file"),
    ]
    for source, match in cases:
        with pytest.raises(InputError, match=match):
            read_bytes(source, OPEN, "image 0")
    assert read_bytes(f"file://{tmp_path}/a.png", OPEN, "image 0") == PNG


def test_unreadable_files(tmp_path):
    if os.path.exists("/proc/self/mem"):  # a regular file even root cannot read from offset 0
        with pytest.raises(InputError, match="cannot read .*Input/output error"):
            read_bytes("/proc/self/mem", OPEN, "image 0")
    if os.geteuid() != 0:  # root reads through permission bits
        p = tmp_path / "locked.png"
        p.write_bytes(PNG)
        p.chmod(0)
        with pytest.raises(InputError, match="Permission denied"):
            read_bytes(str(p), OPEN, "image 0")


def test_paths_cannot_leave_the_local_root(tmp_path, monkeypatch):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (root / "ok.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dir").symlink_to(outside)
    monkeypatch.setenv("HOME", str(outside))
    policy = MediaPolicy(local_root=root)
    for source in (
        root / "link.png",
        root / "dir" / "secret.png",
        root / ".." / "outside" / "secret.png",
        "~/secret.png",
        f"file://{outside}/secret.png",
    ):
        with pytest.raises(InputError, match="outside the allowed media directory"):
            read_bytes(str(source), policy, "image 0")
    assert read_bytes(str(root / "ok.png"), policy, "image 0") == PNG
    with pytest.raises(InputError, match="local files are not accepted"):
        read_bytes(str(root / "ok.png"), MediaPolicy(allow_local=False), "image 0")


def test_data_uris(monkeypatch):
    wrapped = base64.encodebytes(PNG).decode()  # line breaks every 76 characters, as many encoders write
    assert read_bytes("data:image/png;base64," + wrapped, OPEN, "image 0") == PNG
    assert read_bytes("DATA:image/png;BASE64," + base64.b64encode(PNG).decode(), OPEN, "image 0") == PNG
    for uri, match in [
        ("data:image/png;base64,!!!!" + base64.b64encode(PNG).decode(), "not valid base64"),
        ("data:image/png;base64,AAA", "not valid base64"),  # bad padding
        ("data:image/png;base64,AAAA\u00e9", "not valid base64"),
        ("data:image/png;base64", "without a ','"),
        ("data:image/png,%89PNG", "only base64"),
    ]:
        with pytest.raises(InputError, match=match):
            read_bytes(uri, OPEN, "image 0")

    def no_decoding(*args, **kwargs):
        raise AssertionError("the size check must come before decoding")

    monkeypatch.setattr(media.base64, "b64decode", no_decoding)
    with pytest.raises(InputError, match="about 6000 bytes exceeds the limit of 1000"):
        read_bytes("data:image/png;base64," + "A" * 8000, MediaPolicy(max_bytes=1000), "image 0")


# -- images: bombs and corrupt data --------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds one row: what a decompression bomb's header looks like."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * 16)))
        + chunk(b"IEND", b"")
    )


def _data(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("size", [(50000, 50000), (10000, 10000), (9000, 9000)])
@pytest.mark.parametrize("warnings_are_errors", [False, True])
def test_decompression_bombs(size, warnings_are_errors):
    """Over PIL's own limits (179M pixels: an error; 89M: a warning, an exception under -W error) and over only
    the policy's (64M): always an InputError, before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error" if warnings_are_errors else "ignore", Image.DecompressionBombWarning)
        with pytest.raises(InputError, match="pixels"):
            load_image(_data(_png_header(*size)), OPEN, "image 0")
    with pytest.raises(InputError, match="pixels"):  # a policy looser than PIL does not lift PIL's refusal
        load_image(_data(_png_header(50000, 50000)), MediaPolicy(max_image_pixels=10**10), "image 0")


SEEDS = {}
for _fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "ICO", "PPM"):
    _buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(_buf, _fmt)
    SEEDS[_fmt] = _buf.getvalue()


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """edits: (kind, position, byte): overwrite a byte, cut the file there, or insert four copies of the byte."""
    d = bytearray(data)
    for kind, pos, byte in edits:
        if not d:
            break
        pos %= len(d)
        if kind == 0:
            d[pos] = byte
        elif kind == 1:
            del d[pos:]
        else:
            d[pos:pos] = bytes([byte]) * 4
    return bytes(d)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the corrupt TIFF tags it skips
@settings(max_examples=300, deadline=None, derandomize=True)
@given(fmt=st.sampled_from(sorted(SEEDS)), edits=EDITS)
def test_corrupt_images_raise_input_errors_only(fmt, edits):
    try:
        load_image(_data(_mutate(SEEDS[fmt], edits)), OPEN, "image 0")
    except InputError:
        pass


# -- videos --------------------------------------------------------------------------------------------------------


def _video(fmt="mp4", codec="mpeg4", size=(64, 48), frames=8, title=None) -> bytes:
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        if title:
            out.metadata["title"] = title
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(frames):
            img = np.full((size[1], size[0], 3), i * 30 % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_video_lists_and_playlists_cannot_open_other_files(tmp_path, monkeypatch):
    """concat and HLS name other files; FFmpeg would open them past allow_local and local_root. A concat list in a
    data: URI read a video from the server's working directory; an HLS playlist inside local_root read one outside."""
    from qwen2vl.processing.video import load_video

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "v.ts").write_bytes(_video("mpegts", "mpeg2video"))
    monkeypatch.chdir(outside)
    concat = b"ffconcat version 1.0\nfile v.ts\n"
    with pytest.raises(InputError, match="cannot open as a video"):
        load_video({"video": _data(concat, "text/plain")}, MediaPolicy(allow_local=False))
    root = tmp_path / "root"
    root.mkdir()
    (root / "list.m3u8").write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{outside / 'v.ts'}\n#EXT-X-ENDLIST\n"
    )
    with pytest.raises(InputError, match="cannot open as a video"):
        load_video({"video": str(root / "list.m3u8")}, MediaPolicy(local_root=root))
    frames, _ = load_video({"video": str(outside / "v.ts")}, OPEN)  # the same video given directly is fine
    assert frames.shape[0] >= 2


def test_videos_with_awkward_contents():
    from qwen2vl.processing.video import load_video

    # tags that are not UTF-8 (raised UnicodeDecodeError from av.open)
    tagged = _video("matroska", title="QQQQQQQQ").replace(b"QQQQQQQQ", b"\xff\xfe\xfdQQQQQ")
    assert load_video({"video": _data(tagged, "video/x-matroska")}, OPEN)[0].shape[0] >= 2
    # a stream whose picture size changes midway (raised ValueError from np.stack)
    two = _video("mpegts", "mpeg2video", (64, 48), 6) + _video("mpegts", "mpeg2video", (96, 64), 6)
    assert load_video({"video": _data(two, "video/mp2t"), "nframes": 12}, OPEN)[0].shape[0] == 12
    # frames over the pixel cap, refused before decoding
    with pytest.raises(InputError, match="frames of 64x48 exceed the limit of 1000 pixels"):
        load_video({"video": _data(_video())}, MediaPolicy(max_image_pixels=1000))
    # files cut short: in the header, and after it (counting frames then rewinding raised av's PermissionError)
    for cut in (_video()[: len(_video()) // 2], _video("matroska")[:600]):
        with pytest.raises(InputError, match="cannot open as a video|no video stream|unreadable video stream"):
            load_video({"video": _data(cut, "video/x")}, OPEN)


VIDEO_SEEDS: dict[str, bytes] = {}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(fmt=st.sampled_from(["mp4", "matroska"]), edits=EDITS)
def test_corrupt_videos_raise_input_errors_only(fmt, edits):
    from qwen2vl.processing.video import load_video

    seed = VIDEO_SEEDS.setdefault(fmt, _video(fmt, "mpeg4" if fmt == "mp4" else "h264", frames=12))
    try:
        load_video({"video": _data(_mutate(seed, edits), "video/x")}, OPEN)
    except InputError:
        pass
