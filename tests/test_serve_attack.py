"""Attacks on the search server over loopback: malformed and oversized requests, path traversal in image URLs, idle
connections, and a bounded concurrent load generator mixing good and bad requests. After each, the server is up and
answers correctly."""
import json
import random
import re
import socket
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_serve import get, site  # noqa: F401 (the module-scoped running server)
import tbps_clip.serve as serve_mod


def raw(site, data: bytes, read_timeout: float = 30.0) -> bytes:
    "Send raw bytes to the server; everything it answers until it closes the connection."
    host, port = site["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        try: s.sendall(data)
        except (BrokenPipeError, ConnectionResetError): pass  # the server may close before reading everything
        out = b""
        try:
            while chunk := s.recv(65536): out += chunk
        except ConnectionResetError: pass
    return out


def status_of(answer: bytes) -> int:
    "The status of a raw answer; an HTTP/0.9-style answer (no status line) gives the code its error page names."
    if not answer.startswith(b"HTTP/"):
        m = re.search(rb"Error code: (\d{3})", answer)
        return int(m.group(1)) if m else -1
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else -1


def still_up(site):
    "The server answers a normal request correctly."
    s, d = get(site, "/api/info")
    assert s == 200 and d["indexes"][0]["name"] == "gallery" and d["indexes"][0]["images"] == 24


MALFORMED = {
    "not HTTP": (b"GARBAGE\r\n\r\n", {400}),
    "method only": (b"GET\r\n\r\n", {400}),
    "HTTP/9.9": (b"GET / HTTP/9.9\r\n\r\n", {505}),
    "binary request line": (b"\x00\xff\xfe\x80 / HTTP/1.0\r\n\r\n", {400, 501}),
    "invalid UTF-8 in the query": (b"GET /api/search?q=%ff%fe%fd HTTP/1.0\r\n\r\n", {200, 400}),
    "NUL in the query": (b"GET /api/search?q=red%00top HTTP/1.0\r\n\r\n", {200}),
    "raw non-ASCII path": (b"GET /image/gal\xffery/1 HTTP/1.0\r\n\r\n", {404}),
    "request line of 70,000 bytes": (b"GET /api/search?q=" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", {414}),
    "200 headers": (b"GET / HTTP/1.0\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", {431}),
    "header line of 70,000 bytes": (b"GET / HTTP/1.0\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", {400, 431}),
    "bad header": (b"GET / HTTP/1.0\r\nno colon here\r\n\r\n", {200, 400}),
    "17 query parameters": (b"GET /api/search?" + b"&".join(b"p%d=1" % i for i in range(17)) + b" HTTP/1.0\r\n\r\n", {400}),
    "POST": (b"POST /api/search HTTP/1.0\r\nContent-Length: 5\r\n\r\nq=red", {501}),
    "PUT": (b"PUT /image/gallery/1 HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", {501}),
    "DELETE": (b"DELETE / HTTP/1.0\r\n\r\n", {501}),
    "absolute URI": (b"GET http://example.com/api/info HTTP/1.0\r\n\r\n", {200}),
    "asterisk": (b"OPTIONS * HTTP/1.0\r\n\r\n", {501}),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests(site, name):
    data, ok = MALFORMED[name]
    answer = raw(site, data)
    assert status_of(answer) in ok, (name, answer[:300])
    still_up(site)


def test_oversized_bodies_are_not_read(site):
    "A POST announcing a terabyte, or sending 8 MB: answered at once (501), nothing buffered, server up."
    t0 = time.perf_counter()
    answer = raw(site, b"POST /api/search HTTP/1.0\r\nContent-Length: 1000000000000\r\n\r\n" + b"x" * 1000)
    assert status_of(answer) == 501 and time.perf_counter() - t0 < 10
    answer = raw(site, b"POST /api/search HTTP/1.0\r\nContent-Length: 8388608\r\n\r\n" + b"x" * 8_388_608)
    assert status_of(answer) in (501, -1)  # -1: the server closed before our 8 MB were sent, which is fine
    answer = raw(site, b"GET /api/info HTTP/1.0\r\nContent-Length: 1000000000000\r\n\r\n")  # a GET with a 'body'
    assert status_of(answer) == 200
    still_up(site)


TRAVERSAL = ["/image/gallery/..%2F..%2Fa.pt", "/image/gallery/%2e%2e%2f%2e%2e%2fa.pt", "/image/gallery/%252e%252e%252fa.pt",
             "/image/..%2F..%2Fa.pt/1", "/image/%2e%2e/1", "/image/gallery/1%00", "/image/gallery/1%2F..%2F..%2Fa.pt",
             "/image/gallery/%EF%BC%91",  # a full-width digit one
             "/image/gallery/%D9%A1",  # an Arabic-Indic digit one
             "/image/gallery/+1", "/image/gallery/1.0", "/image/gallery/1e0", "/image/gallery/%201",
             "/image/gallery/0x1", "/image/gallery/99999999999999999999", "/image/gallery\\..\\..\\a.pt/1",
             "/image/gallery/1/", "/image//1", "/../../a.pt", "/image/gallery/..", "/%2e%2e/%2e%2e/etc/passwd",
             "/image/gallery/%C0%AE%C0%AE%2Fa.pt"]  # overlong UTF-8 dots


@pytest.mark.parametrize("path", TRAVERSAL)
def test_traversal_in_image_urls(site, path):
    s, d = get(site, path)
    assert s == 404 and isinstance(d, dict) and d["error"], (path, s)
    answer = raw(site, f"GET {path} HTTP/1.0\r\n\r\n".encode())  # also unnormalised by any client library
    assert status_of(answer) == 404 and b"tbps-clip-checkpoint" not in answer


def test_idle_connections_are_closed(site, monkeypatch):
    "A client that connects and sends half a request does not hold a server thread for ever."
    monkeypatch.setattr(serve_mod.Handler, "timeout", 1.0)
    host, port = site["url"].removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port)), timeout=20) for _ in range(5)]
    for s in socks: s.sendall(b"GET /api/info HTTP/1.0\r\nX-Slow: ")
    still_up(site)  # others are served meanwhile
    t0 = time.perf_counter()
    for s in socks:
        assert s.recv(100) == b""  # the server closed it
        s.close()
    assert time.perf_counter() - t0 < 15
    assert serve_mod.Handler.timeout is not None


def test_default_request_timeout_is_set():
    assert serve_mod.Handler.timeout == serve_mod.REQUEST_TIMEOUT_S and 0 < serve_mod.REQUEST_TIMEOUT_S <= 120


def test_bounded_concurrent_load_with_bad_requests(site, record_property):
    "16 clients, 400 requests: searches, refused searches, images and traversal attempts, all answered correctly."
    app = site["app"]
    idx, enc = app.indexes["gallery"], app.encoders["gallery"]
    rng = random.Random(0)
    colours = ("red", "green", "blue", "black", "white", "yellow")
    queries = [f"a person in a {a} top and {b} trousers" for a in colours for b in colours if a != b][:12]
    expect = {q: [(h.rank, h.index, h.path) for h in idx.search(enc, q, k=5)] for q in queries}
    images = {i: idx.file(i).read_bytes() for i in range(len(idx))}
    jobs = []
    for _ in range(400):
        kind = rng.choice(["search", "search", "bad", "image", "traversal"])
        if kind == "search": jobs.append((kind, rng.choice(queries)))
        elif kind == "bad": jobs.append((kind, rng.choice(["q=", "q=red&page=0", "q=red&per_page=1000", "q=!!!", "q=a&q=b",
                                                          "q=" + "x" * 1001, "q=red&index=../../etc"])))
        elif kind == "image": jobs.append((kind, rng.randrange(len(idx))))
        else: jobs.append((kind, rng.choice(TRAVERSAL)))

    def run(job):
        kind, arg = job
        t0 = time.perf_counter()
        if kind == "search":
            s, d = get(site, "/api/search?per_page=5&q=" + urllib.parse.quote(arg))
            ok = s == 200 and [(r["rank"], r["id"], r["path"]) for r in d["results"]] == expect[arg]
        elif kind == "bad":
            s, d = get(site, "/api/search?" + arg)
            ok = s in (400, 404) and bool(d["error"])
        elif kind == "image":
            s, d = get(site, f"/image/gallery/{arg}")
            ok = s == 200 and d == images[arg]
        else:
            s, d = get(site, arg)
            ok = s == 404
        return ok, time.perf_counter() - t0, kind

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(run, jobs))
    wall = time.perf_counter() - t0
    wrong = [(j, r) for j, r in zip(jobs, results) if not r[0]]
    assert not wrong, wrong[:5]
    lat = sorted(r[1] for r in results)
    print(f"\nload: {len(jobs)} requests from 16 clients in {wall:.1f} s; latency median {lat[len(lat) // 2] * 1000:.0f} ms, "
          f"max {lat[-1] * 1000:.0f} ms; kinds {dict((k, sum(1 for _, _, x in results if x == k)) for k in ('search', 'bad', 'image', 'traversal'))}")
    record_property("requests", len(jobs))
    still_up(site)


def test_connections_beyond_the_limit_get_503_and_slots_come_back(site):
    "A flood of connections cannot grow the server's threads: beyond the limit they get 503 at once, and slots return."
    srv, url = serve_mod.start_in_thread(site["app"], max_connections=2)
    try:
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=20) for _ in range(2)]
        for s in held: s.sendall(b"GET /api/info HTTP/1.0\r\nX-Slow: ")  # both slots busy, waiting for the rest
        time.sleep(0.3)
        t0 = time.perf_counter()
        answer = raw(dict(url=url), b"GET /api/info HTTP/1.0\r\n\r\n")
        assert status_of(answer) == 503 and b"Retry-After: 1" in answer and b"too many connections" in answer
        assert time.perf_counter() - t0 < 5  # refused at once, not queued behind the slow ones
        for s in held: s.close()  # their threads end, and their slots come back
        deadline = time.time() + 10
        while status_of(raw(dict(url=url), b"GET /api/info HTTP/1.0\r\n\r\n")) == 503 and time.time() < deadline: time.sleep(0.1)
        assert status_of(raw(dict(url=url), b"GET /api/info HTTP/1.0\r\n\r\n")) == 200
    finally:
        srv.shutdown(); srv.server_close()
    with pytest.raises(serve_mod.TBPSError, match="max_connections must be at least 1"):
        serve_mod.make_server(site["app"], port=0, max_connections=0)


def test_a_refused_client_that_trickles_bytes_does_not_hold_the_accepting_thread(site):
    "The 503 path runs on the accepting thread: a client sending a byte at a time must not keep others waiting."
    import threading
    srv, url = serve_mod.start_in_thread(site["app"], max_connections=1)
    host, port = url.removeprefix("http://").split(":")
    stop = threading.Event()
    def trickle():
        with socket.create_connection((host, int(port)), timeout=20) as s:
            while not stop.is_set():
                try: s.sendall(b"x")
                except OSError: return  # the server closed it: what should happen
                time.sleep(0.05)
    try:
        held = socket.create_connection((host, int(port)), timeout=20)
        held.sendall(b"GET /api/info HTTP/1.0\r\nX-Slow: ")  # the only slot is busy
        time.sleep(0.3)
        t = threading.Thread(target=trickle, daemon=True); t.start()
        time.sleep(0.5)  # the trickler is being refused now
        t0 = time.perf_counter()
        answer = raw(dict(url=url), b"GET /api/info HTTP/1.0\r\n\r\n")
        assert status_of(answer) == 503 and time.perf_counter() - t0 < 2, time.perf_counter() - t0
        held.close()
    finally:
        stop.set(); srv.shutdown(); srv.server_close()


def test_clients_that_hang_up_leave_no_traceback(site, capfd):
    "A client that resets the connection mid-request or mid-answer (a closed tab) is dropped quietly, and others are served."
    import struct
    srv, url = serve_mod.start_in_thread(site["app"], quiet=False)  # not quiet: whatever the server prints is seen
    host, port = url.removeprefix("http://").split(":")
    try:
        for i in range(20):
            s = socket.create_connection((host, int(port)), timeout=20)
            s.sendall([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /api/search?q=red+top&per_page=100 HTTP/1.1\r\nHost: x\r\n\r\n",
                       b"GET /image/gallery/3 HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /api/sea"][i % 4])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset at once
            s.close()
        assert status_of(raw(dict(url=url), b"GET /api/info HTTP/1.0\r\n\r\n")) == 200
        time.sleep(1)  # the handler threads of the hung-up clients finish
    finally:
        srv.shutdown(); srv.server_close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
    assert err.count("[tbps-clip serve]") >= 1  # the server did log (so the capture works): only requests, no errors
