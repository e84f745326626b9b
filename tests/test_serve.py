"""The local search page (tbps_clip.serve): validated requests, images only by number, bounded load, and a real browser."""
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tbps_clip.fixtures import make_toy_dataset
from test_search import micro_checkpoint, run_cli
from tbps_clip.core import TBPSError
from tbps_clip.search import Encoder, GalleryIndex
from tbps_clip.serve import MAX_QUERY_CHARS, SearchApp, start_in_thread


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "A running server on 127.0.0.1 over an index of the toy test images."
    root = tmp_path_factory.mktemp("serve")
    make_toy_dataset(root / "toy", n_ids=(1, 1, 8))
    ckpt = micro_checkpoint(root / "a.pt")
    assert run_cli("index", root / "toy/images/test", "--out", root / "gallery", "--checkpoint", ckpt, "--quiet")[0] == 0
    app = SearchApp.open([root / "gallery"])
    srv, url = start_in_thread(app)
    yield dict(url=url, app=app, root=root, ckpt=ckpt)
    srv.shutdown(); srv.server_close()


def get(site, path):
    "(status, parsed JSON or raw bytes) of GET `path`."
    try:
        with urllib.request.urlopen(site["url"] + path, timeout=60) as r:
            body, ctype = r.read(), r.headers["Content-Type"]
            return r.status, json.loads(body) if ctype.startswith("application/json") else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_search_api_pages_match_the_python_search(site):
    idx, enc = site["app"].indexes["gallery"], site["app"].encoders["gallery"]
    q = "a person in a red top and blue trousers"
    full = idx.search(enc, q, k=len(idx))
    got = []
    for page in (1, 2, 3):
        s, d = get(site, f"/api/search?q={urllib.request.quote(q)}&page={page}&per_page=10")
        assert s == 200 and d["page"] == page and d["pages"] == 3 and d["total"] == 24 and d["latency_ms"] > 0
        got += d["results"]
    assert [(r["rank"], r["id"], r["path"]) for r in got] == [(h.rank, h.index, h.path) for h in full]
    assert [r["score"] for r in got] == [h.score for h in full]


@pytest.mark.parametrize("query, status, message", [
    ("", 400, "Type a description of the person"),
    ("q=%20%20%20", 400, "Type a description of the person"),
    ("q=" + "a" * (MAX_QUERY_CHARS + 1), 400, f"is {MAX_QUERY_CHARS + 1} characters long; the limit is {MAX_QUERY_CHARS}"),
    ("q=%21%21%21", 400, "is empty: describe the person in words"),
    ("q=red&index=nope", 404, "unknown index 'nope'; available: gallery"),
    ("q=red&page=0", 400, "'page' must be at least 1"),
    ("q=red&page=x", 400, "'page' must be a whole number"),
    ("q=red&per_page=101", 400, "'per_page' must be between 1 and 100"),
    ("q=red&per_page=-5", 400, "'per_page' must be a whole number"),
    ("q=red&q=blue", 400, "parameter 'q' is given more than once"),
])
def test_bad_requests_get_clear_messages(site, query, status, message):
    s, d = get(site, "/api/search?" + query)
    assert s == status and message in d["error"], d


def test_longest_allowed_query_is_answered_and_says_what_is_not_searched(site):
    s, d = get(site, "/api/search?q=" + "red+" * (MAX_QUERY_CHARS // 4))
    assert s == 200 and len(d["query"]) == MAX_QUERY_CHARS and len(d["results"]) == 20
    assert d["notes"] == ['The description "red red red red red red ..." is cut to its first 30 of 250 words '
                          '(the model reads 32 text tokens); not searched: "red red red red red red red red ..."']


def test_a_page_past_the_results_says_where_they_end(site):
    s, d = get(site, "/api/search?q=red&page=4&per_page=10")
    assert s == 200 and d["results"] == [] and (d["page"], d["pages"], d["total"]) == (4, 3, 24)
    assert d["notes"] == ["The results end on page 3: 24 images at 10 a page; page 4 is past them."]
    s, d = get(site, "/api/search?q=%21%21%21&page=4")  # the description is still checked
    assert s == 400 and "is empty" in d["error"]
    s, d = get(site, "/api/search?q=red&page=3&per_page=10")
    assert s == 200 and len(d["results"]) == 4 and d["notes"] == []


def test_the_page_suggests_examples(site):
    s, d = get(site, "/api/info")
    assert s == 200 and len(d["examples"]) >= 3 and all(isinstance(q, str) and q for q in d["examples"])


@pytest.mark.parametrize("path", ["/image/gallery/24", "/image/gallery/-1", "/image/gallery/0x1", "/image/gallery/..%2F..%2Fa.pt",
                                  "/image/gallery/../../a.pt", "/image/other/0", "/image/gallery/%2Fetc%2Fpasswd",
                                  "/a.pt", "/gallery/index.json", "/image/gallery/1/../../../a.pt"])
def test_only_indexed_images_are_served(site, path):
    s, d = get(site, path)
    assert s == 404 and d["error"]


def test_images_are_served_by_number(site):
    idx = site["app"].indexes["gallery"]
    s, body = get(site, "/image/gallery/5")
    assert s == 200 and body == idx.file(5).read_bytes()


def test_bounded_concurrent_load(site):
    queries = [f"a person in a {c} top" for c in ("red", "green", "blue", "black")] * 10
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda q: get(site, "/api/search?per_page=5&q=" + urllib.request.quote(q)), queries))
    assert all(s == 200 for s, _ in answers)
    first = {q: d["results"] for q, (_, d) in zip(queries[:4], answers[:4])}
    assert all(d["results"] == first[q] for q, (_, d) in zip(queries, answers))


def test_the_command_line_default_is_the_servers():
    "`tbps-clip serve --help` shows --max-connections' default; it must be the cap the server applies (serve.MAX_CONNECTIONS)."
    from tbps_clip.cli import build_parser
    from tbps_clip.serve import MAX_CONNECTIONS
    p = build_parser()
    assert p.parse_args(["serve", "--index", "x"]).max_connections == MAX_CONNECTIONS
    sub = next(a for a in p._subparsers._group_actions if a.choices and "serve" in a.choices).choices["serve"]
    assert f"more get 503 (default: {MAX_CONNECTIONS})" in " ".join(sub.format_help().split())


def test_unknown_index_or_wrong_model_is_refused_at_start(site, tmp_path):
    with pytest.raises(TBPSError, match="index not found"):
        SearchApp.open([tmp_path / "nowhere"])
    other = micro_checkpoint(tmp_path / "b.pt", seed=3)
    with pytest.raises(TBPSError, match="built by a different model"):
        SearchApp.open([site["root"] / "gallery"], checkpoint=other)


# ---- a real browser ------------------------------------------------------------------------------------------

def test_page_in_headless_chromium(site, browser, tmp_path):
    "A search in the page shows the Python search's hits, scores and ranks, pages on, and shows a refused query's message."
    b, drv, By, Keys = browser, browser.drv, browser.By, browser.Keys
    drv.get(site["url"] + "/")
    b.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#index option"))
    box = drv.find_element(By.ID, "q")
    q = "a person in a red top and blue trousers"
    box.send_keys(q, Keys.ENTER)
    b.wait.until(lambda d: len(b.hits()) == 20)
    idx, enc = site["app"].indexes["gallery"], site["app"].encoders["gallery"]
    expect = idx.search(enc, q, k=20)
    hits = b.hits()
    assert [h.get_attribute("data-path") for h in hits] == [e.path for e in expect]
    assert [h.find_element(By.CSS_SELECTOR, ".score").text for h in hits] == [f"{e.score:.3f}" for e in expect]
    assert hits[0].find_element(By.CSS_SELECTOR, ".rank").text == "#1"
    b.images_loaded()
    assert "Results 1\u201320 of 24" in b.text("status") and "ms in the server" in b.text("status")
    drv.save_screenshot(os.environ.get("TBPS_SCREENSHOT") or str(tmp_path / "page.png"))
    # paging
    drv.find_element(By.ID, "next").click()
    b.shows("pageinfo", "page 2 of 2")
    assert [h.find_element(By.CSS_SELECTOR, ".rank").text for h in b.hits()] == [f"#{r}" for r in range(21, 25)]
    assert drv.find_element(By.ID, "next").get_attribute("disabled") is not None
    # a refused query shows the server's message, not results
    box.clear(); box.send_keys("!!!", Keys.ENTER)
    b.shows("error", "is empty")
    assert not b.hits()
    assert int(box.get_attribute("maxlength")) == MAX_QUERY_CHARS


def test_a_search_is_an_address(site, browser, tmp_path):
    "/?q=...&per_page=...&page=... runs that search on load; each search writes its address; Back returns to the last."
    from urllib.parse import parse_qs, quote, urlsplit
    b, drv, By = browser, browser.drv, browser.By
    idx, enc = site["app"].indexes["gallery"], site["app"].encoders["gallery"]
    q1, q2 = "a person in a red top and blue trousers", "green pants with a white shirt"
    shown = lambda: [h.get_attribute("data-path") for h in b.hits()]
    address = lambda: {k: v[0] for k, v in parse_qs(urlsplit(drv.current_url).query).items()}
    drv.get(site["url"] + f"/?q={quote(q1)}&per_page=10&page=2")  # a bookmarked search: page 2 of 3, ten a page
    b.shows("pageinfo", "page 2 of 3")
    assert shown() == [h.path for h in idx.search(enc, q1, k=10, offset=10)]
    assert drv.find_element(By.ID, "q").get_attribute("value") == q1
    assert drv.find_element(By.ID, "per_page").get_attribute("value") == "10"
    assert "Results 11\u201320 of 24" in b.text("status")
    b.images_loaded()
    drv.save_screenshot(os.environ.get("TBPS_SCREENSHOT_Q") or str(tmp_path / "page_q.png"))
    assert address() == dict(q=q1, index="gallery", page="2", per_page="10")  # completed, not a new history entry
    box = drv.find_element(By.ID, "q")
    box.clear(); box.send_keys(q2, b.Keys.ENTER)  # a new search writes its own address
    b.wait.until(lambda d: address().get("q") == q2)
    b.shows("pageinfo", "page 1 of 3")
    assert address() == dict(q=q2, index="gallery", page="1", per_page="10")
    assert shown() == [h.path for h in idx.search(enc, q2, k=10)]
    drv.back()  # the previous search comes back, results and all
    b.shows("pageinfo", "page 2 of 3")
    assert drv.find_element(By.ID, "q").get_attribute("value") == q1 and shown() == [h.path for h in idx.search(enc, q1, k=10, offset=10)]
    drv.get(site["url"] + "/?q=red&per_page=7&page=x")  # a bad address gets the server's message, not results
    b.shows("error", "'page' must be a whole number")
    assert not b.hits()


def test_the_empty_page_suggests_examples_and_a_page_past_the_results_says_where_they_end(site, browser, tmp_path):
    "The empty page lists example queries that search when clicked; a page past the results says where they end."
    from tbps_clip.serve import EXAMPLES
    b, drv, By = browser, browser.drv, browser.By
    drv.get(site["url"] + "/")
    b.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples li a"))
    links = drv.find_elements(By.CSS_SELECTOR, "#examples li a")
    assert drv.find_element(By.ID, "examples").is_displayed() and [a.text for a in links] == list(EXAMPLES)
    drv.save_screenshot(os.environ.get("TBPS_SCREENSHOT_EMPTY") or str(tmp_path / "empty.png"))
    links[0].click()  # an example is a search
    b.wait.until(lambda d: len(b.hits()) == 20)
    assert drv.find_element(By.ID, "q").get_attribute("value") == EXAMPLES[0]
    assert not drv.find_element(By.ID, "examples").is_displayed()
    drv.get(site["url"] + "/?q=red&per_page=10&page=7")  # past the 3 pages of 24 images
    b.shows("notes", "The results end on page 3: 24 images at 10 a page")
    assert not b.hits() and b.text("error") == ""
    assert b.text("status").startswith("No results on page 7 (24 in all) for \u201cred\u201d")
    assert b.text("prev") == "\u2190 Last page (3)"
    drv.save_screenshot(os.environ.get("TBPS_SCREENSHOT_PAST") or str(tmp_path / "past.png"))
    drv.find_element(By.ID, "prev").click()
    b.shows("pageinfo", "page 3 of 3")
    assert len(b.hits()) == 4 and b.text("notes") == ""
