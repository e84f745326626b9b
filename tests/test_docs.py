"""The documentation site builds from the notebooks and docs/ (.ci/build_docs.py, nbdev's processing), every link of
every page resolves, and it renders in a browser.

The build runs once per session into a temporary folder (about 2 minutes on 2 cores: the notebooks of EXECUTE run for
their figures, nbdev's processing of all of them, the pages written by nbconvert, as in CI where quarto cannot be
installed).
TBPS_DOCS_SCREENSHOTS=folder keeps the screenshots (docs/screenshots/ holds the committed ones).
"""
import base64
import hashlib
import html
import importlib.util
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "nbs").glob("*.ipynb"))
GUIDES = sorted(f"docs/{p.stem}.html" for p in (ROOT / "docs").glob("*.md"))


def _digest(p: Path) -> str: return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The built site's folder (the build must leave the repository's README.md and nbs/ as they were)."
    if importlib.util.find_spec("nbdev") is None or importlib.util.find_spec("nbclient") is None:
        pytest.skip("nbdev / nbclient are not installed (pip install -e '.[dev]')")
    build_docs = _build_docs()
    before = {p: _digest(p) for p in [ROOT / "README.md", *sorted((ROOT / "nbs").glob("*.ipynb"))]}
    folders = {d: (ROOT / d).exists() for d in ("_proc", "_docs", "nbs/_quarto.yml", "nbs/sidebar.yml")}
    out = tmp_path_factory.mktemp("docs") / "site"
    with pytest.MonkeyPatch.context() as mp:  # the executed notebooks use the session's private cache, not the user's
        mp.setenv("TBPS_CLIP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        report = build_docs.build(out, engine="nbconvert")  # CI's renderer (quarto cannot be installed offline)
    assert {p: _digest(p) for p in before} == before, "the docs build changed README.md or a notebook"
    assert {d: (ROOT / d).exists() for d in folders} == folders, "the docs build wrote into the repository"
    return dict(out=out, **report)


def _build_docs():
    "The build script as a module."
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / ".ci" / "build_docs.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


def _page(site, name: str) -> str: return (site["out"] / f"{name}.html").read_text(encoding="utf-8")


def _pngs(html: str) -> list:
    "The inline PNG figures of a page, decoded."
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=\s]+)"', html)]


def test_every_notebook_guide_and_module_has_a_page(site):
    "A page per notebook, named as nbdev names them (serve.html); a page per docs/*.md under docs/; each module's source."
    out = site["out"]
    assert len(list(out.glob("*.html"))) == len(NOTEBOOKS) and {"index.html", "serve.html", "search_tutorial.html"} <= {
        p.name for p in out.glob("*.html")}
    assert all((out / g).is_file() for g in GUIDES) and len(GUIDES) >= 6
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tbps_clip").rglob("*.py"))
    assert sorted(p.relative_to(out / "src").as_posix()[:-5] for p in (out / "src").rglob("*.html")) == modules


def site_links(out: Path) -> list:
    "Every href and src of every page of the site: (page, attribute, value); inline data left out."
    found = []
    for p in sorted(out.rglob("*.html")):
        for attr, value in re.findall(r'\b(href|src)="([^"]*)"', p.read_text(encoding="utf-8")):
            if not value.startswith("data:"): found.append((p.relative_to(out).as_posix(), attr, html.unescape(value)))
    return found


def test_every_link_of_every_page_resolves(site):
    "Each href and src of each page leads to a file of the site, and to an anchor there when it names one; no placeholder host."
    out = site["out"]
    ids = {}
    def anchors(page):
        if page not in ids: ids[page] = set(re.findall(r'\bid="([^"]+)"', (out / page).read_text(encoding="utf-8")))
        return ids[page]
    links, bad, external = site_links(out), [], 0
    for page, attr, value in links:
        u = urlsplit(value)
        if u.scheme in ("http", "https") or value.startswith("//"):
            external += 1
            if (u.hostname or "").endswith(".invalid"): bad.append((page, value, "placeholder host"))
            continue
        if u.scheme: bad.append((page, value, "scheme")); continue
        target = os.path.normpath(os.path.join(os.path.dirname(page), unquote(u.path))).replace(os.sep, "/") if u.path else page
        if target.startswith("..") or not (out / target).is_file(): bad.append((page, value, "no such file")); continue
        if u.fragment and target.endswith(".html") and unquote(u.fragment) not in anchors(target):
            bad.append((page, value, "no such anchor"))
    pages = len(list(out.rglob("*.html")))
    print(f"\n{len(links)} links checked in {pages} pages ({external} to other sites): "
          + ("all resolve" if not bad else f"{len(bad)} do not"))
    assert not bad, bad[:20]
    assert len(links) > 2000 and site["links"] > 1000, (len(links), site["links"])
    assert not site["dropped"], site["dropped"]  # the build found every page and anchor it was asked for
    # nbdev links each name in backticks to its show_doc heading (a heading named as the anchor): many are there
    def api_heading(page, value):
        target, _, frag = value.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
        text = (out / target).read_text(encoding="utf-8") if frag and target.endswith(".html") else ""
        return bool(frag) and re.search(rf'<h[34] id="{re.escape(frag)}">{re.escape(frag)}\b', text, re.I) is not None
    api = [(p, v) for p, a, v in links if a == "href" and not v.startswith("http") and api_heading(p, v)]
    assert len(api) > 50, len(api)
    # the API docs' "source" links lead to the module's source page, at the line
    src = [v for p, a, v in links if p == "serve.html" and v.startswith("src/tbps_clip/serve.py.html#L")]
    assert src and all(v.split("#")[1] in anchors("src/tbps_clip/serve.py.html") for v in src), src[:3]


def test_figures_of_the_executed_notebooks_are_in_their_pages(site):
    "The tutorial's two contact sheets, SynthPEDES' sample sheets and the evaluation figure are real PNG images."
    for name, least in (("search_tutorial", 2), ("synthpedes", 2), ("evaluate", 1)):
        pngs = _pngs(_page(site, name))
        assert len(pngs) >= least, (name, len(pngs))
        assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 2000 for p in pngs), name
    front = _page(site, "index")  # the front page's five-line example ran: its printed search hits are there
    assert "Hit(#1, score" in front and "tbps-micro" in front


def test_api_docs_and_no_errors_in_the_pages(site):
    "nbdev's show_doc output is rendered (signature and docstring), and no page shows a traceback or a warning."
    serve = _page(site, "serve")
    assert re.search(r"<h[34][^>]*>\s*make_server", serve) and "A threading HTTP server for" in serve
    assert "BoundedHTTPServer" in serve and "#| export" not in serve and "#| echo" not in serve
    for p in site["out"].glob("*.html"):
        text = p.read_text(encoding="utf-8")
        for bad in ("Traceback (most recent call last)", "IProgress not found", "TqdmWarning", "output_error",
                    "output-file:", '{target="_blank"'):  # nor nbdev's front matter or quarto-only markup as text
            assert bad not in text, (p.name, bad)


def test_index_and_a_module_page_render_in_headless_chromium(site, browser, tmp_path):
    "The front page, the search tutorial (its figures loaded) and a module page render in a real browser, as a user sees them."
    drv, By = browser.drv, browser.By
    shots = Path(os.environ.get("TBPS_DOCS_SCREENSHOTS") or tmp_path); shots.mkdir(parents=True, exist_ok=True)
    figures_loaded = "return [...document.images].length > 0 && [...document.images].every(i => i.complete && i.naturalWidth > 0)"
    drv.get((site["out"] / "index.html").as_uri())
    assert "tbps-clip" in drv.title
    assert drv.find_element(By.CSS_SELECTOR, "h1").text == "tbps-clip"
    root = site["out"].as_uri() + "/"
    links = [a.get_attribute("href").removeprefix(root) for a in drv.find_elements(By.CSS_SELECTOR, "nav a, .sidebar a")]
    assert len(set(links)) == len(NOTEBOOKS) + len(GUIDES) and {"index.html", "serve.html", *GUIDES} <= set(links), sorted(set(links))
    body = drv.find_element(By.TAG_NAME, "main").text
    assert "In five lines" in body and "GalleryIndex.build(encoder, folder)" in body  # the front-door table rendered
    headings = [h.text.strip("¶ ") for h in drv.find_elements(By.CSS_SELECTOR, "main h2")]
    assert {"Install", "On the command line", "From Python", "Guides"} <= set(headings), headings
    for internal in ("__dir__", "__getattr__", "Call self as a function", "_LAZY", "subprocess.run"):
        assert internal not in body, internal  # the front page shows what a user needs, not the module's machinery
    drv.save_screenshot(str(shots / "docs-index.png"))
    link = drv.find_element(By.CSS_SELECTOR, 'nav a[href="search_tutorial.html"]')
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)  # a long sidebar scrolls
    link.click()  # the sidebar leads on
    assert drv.current_url.endswith("search_tutorial.html")
    browser.wait.until(lambda d: d.execute_script(figures_loaded), "the tutorial's figures did not load")
    sizes = drv.execute_script("return [...document.images].map(i => [i.naturalWidth, i.naturalHeight])")
    assert len(sizes) >= 2 and all(w > 200 and h > 100 for w, h in sizes), sizes
    drv.execute_script("document.images[0].scrollIntoView()")
    drv.save_screenshot(str(shots / "docs-tutorial.png"))
    drv.get((site["out"] / "serve.html").as_uri())  # a module page: prose, API docs, code
    main = drv.find_element(By.TAG_NAME, "main")
    assert drv.find_element(By.CSS_SELECTOR, "h1").text.startswith("serve")
    assert "make_server" in main.text and "The HTTP server" in main.text
    assert main.find_elements(By.CSS_SELECTOR, ".highlight, pre")  # code blocks are there and styled
    drv.save_screenshot(str(shots / "docs-module.png"))


def test_an_executed_progress_bar_is_a_widget_without_warning_and_its_final_text_is_shown(tmp_path):
    "With ipywidgets (dev extra) tqdm.auto draws a widget, not 'IProgress not found'; the static page shows its end state."
    nbformat = pytest.importorskip("nbformat"); pytest.importorskip("nbclient")
    from nbformat.v4 import new_code_cell, new_notebook
    nb = new_notebook(cells=[new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(7), desc='embedding'): pass")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, tmp_path / "bar.ipynb")
    build_docs = _build_docs()
    build_docs.execute(tmp_path / "bar.ipynb")
    nb = nbformat.read(tmp_path / "bar.ipynb", as_version=4)
    outs = nb.cells[0].outputs
    assert not [o for o in outs if o.output_type == "stream" and "IProgress" in o.text], outs
    view = [o for o in outs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(view) == 1, outs
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    text = build_docs._widget_text(view[0].data["application/vnd.jupyter.widget-view+json"]["model_id"], state)
    assert text.startswith("embedding:") and "100%|██████████|" in text and "7/7" in text, text


def test_source_links_go_to_a_repository_only_when_one_is_configured():
    "settings.ini's placeholder git_url (an .invalid host) names no repository: the site's own source pages stand in."
    build_docs = _build_docs()
    assert build_docs.repository_url({"git_url": "https://example.invalid/tbps-clip"}) is None
    assert build_docs.repository_url({"git_url": ""}) is None
    assert build_docs.repository_url({"git_url": "https://github.com/someone/tbps-clip/"}) == "https://github.com/someone/tbps-clip"
