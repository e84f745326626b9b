"""The documentation site builds from the notebooks (.ci/build_docs.py, nbdev's processing) and renders in a browser.

The build runs once per session into a temporary folder (about 2 minutes on 2 cores: five notebooks executed for their
figures, nbdev's processing of all of them, the pages written by nbconvert, as in CI where quarto cannot be installed).
TBPS_DOCS_SCREENSHOTS=folder keeps the screenshots (docs/screenshots/ holds the committed ones).
"""
import base64
import hashlib
import importlib.util
import os
import re
from pathlib import Path

import pytest

from test_serve import headless_chromium

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "nbs").glob("*.ipynb"))


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
        engine = build_docs.build(out, engine="nbconvert")  # CI's renderer (quarto cannot be installed offline)
    assert {p: _digest(p) for p in before} == before, "the docs build changed README.md or a notebook"
    assert {d: (ROOT / d).exists() for d in folders} == folders, "the docs build wrote into the repository"
    return dict(out=out, engine=engine)


def _build_docs():
    "The build script as a module."
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / ".ci" / "build_docs.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


def _page(site, name: str) -> str: return (site["out"] / f"{name}.html").read_text(encoding="utf-8")


def _pngs(html: str) -> list:
    "The inline PNG figures of a page, decoded."
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=\s]+)"', html)]


def test_every_notebook_has_a_page_and_links_between_pages_work(site):
    "A page per notebook, named as nbdev names them (serve.html); every link to a page of the site finds its page and anchor."
    pages = {p.name: p.read_text(encoding="utf-8") for p in site["out"].glob("*.html")}
    assert len(pages) == len(NOTEBOOKS) and {"index.html", "serve.html", "search_tutorial.html", "synthpedes.html"} <= set(pages)
    ids = {name: set(re.findall(r'id="([^"]+)"', text)) for name, text in pages.items()}
    links = {h for text in pages.values() for h in re.findall(r'href="([^"#:]+\.html)(?:#[^"]*)?"', text)}
    assert links <= set(pages), sorted(links - set(pages))
    # nbdev links each name in backticks to its show_doc heading; methods and private names have none (in quarto too)
    api = [(p, a) for text in pages.values() for p, a in re.findall(r'href="([a-z_]+\.html)#([^"._]+[^".]*)"', text)]
    assert len(api) > 50 and all(a in ids[p] for p, a in api), [x for x in api if x[1] not in ids[x[0]]][:5]


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


def test_index_and_a_module_page_render_in_headless_chromium(site, tmp_path):
    drv = headless_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    shots = Path(os.environ.get("TBPS_DOCS_SCREENSHOTS") or tmp_path); shots.mkdir(parents=True, exist_ok=True)
    figures_loaded = "return [...document.images].length > 0 && [...document.images].every(i => i.complete && i.naturalWidth > 0)"
    try:
        drv.get((site["out"] / "index.html").as_uri())
        assert "tbps-clip" in drv.title
        assert drv.find_element(By.CSS_SELECTOR, "h1").text == "tbps-clip"
        links = [a.get_attribute("href").rsplit("/", 1)[-1] for a in drv.find_elements(By.CSS_SELECTOR, "nav a, .sidebar a")]
        assert len(set(links)) == len(NOTEBOOKS) and {"index.html", "serve.html"} <= set(links), sorted(set(links))
        body = drv.find_element(By.TAG_NAME, "main").text
        assert "In five lines" in body and "GalleryIndex.build(encoder, folder)" in body  # the front-door table rendered
        drv.save_screenshot(str(shots / "docs-index.png"))
        drv.find_element(By.CSS_SELECTOR, 'nav a[href="search_tutorial.html"]').click()  # the sidebar leads on
        assert drv.current_url.endswith("search_tutorial.html")
        WebDriverWait(drv, 30).until(lambda d: d.execute_script(figures_loaded), "the tutorial's figures did not load")
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
    finally:
        drv.quit()


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
