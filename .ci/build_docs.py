"""Build the documentation site from the notebooks: `python .ci/build_docs.py OUT` writes OUT/index.html and a page per notebook.

nbdev's own steps make the pages (`refresh_quarto_yml`, `nbdev_sidebar`, `proc_nbs`: front matter, `show_doc` API
docs, hidden cells and export directives). The notebooks are stored without outputs (nbdev_clean), so the ones with
figures (EXECUTE) are run first, in a copy, with a Jupyter kernel; the others show their code and API docs. The site is
rendered by quarto when it is installed (`pip install -e ".[docs]"`: then the pages are `nbdev_docs`' own, README.md
left alone), else by nbconvert: quarto cannot be installed offline (its PyPI package downloads the binary while
installing), and CI is offline.
Everything happens in a temporary copy, so the repository's README.md, _proc/ and _docs/ are never touched.
"""
import argparse
import ast
import html
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the notebooks whose figures and printed results belong in the docs: the front page, the tutorial, and the module
# notebooks that show figures (SynthPEDES samples, the evaluation figure) or search results; ~10 s each on a CPU
EXECUTE = ["index.ipynb", "22_search_tutorial.ipynb", "03_synthpedes.ipynb", "10_evaluate.ipynb", "20_search.ipynb"]


def log(msg: str): print(f"[build_docs] {msg}", flush=True)


def copy_project(work: Path) -> Path:
    "settings.ini, README.md and nbs/ copied to `work` (nbdev writes nbs/_quarto.yml, nbs/sidebar.yml and _proc/ there)."
    for f in ("settings.ini", "README.md"): shutil.copy2(ROOT / f, work / f)
    shutil.copytree(ROOT / "nbs", work / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_proc", "_docs"))
    return work / "nbs"


def execute(nb_path: Path, timeout: int = 600):
    "Run the notebook in a fresh kernel from its folder and store its outputs in place."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(nb_path.parent)}}).execute()
    nbformat.write(nb, nb_path)


def _imports_only(source: str) -> str:
    "The import statements of a cell's source (the rest may need cells the docs processor does not run)."
    tree = ast.parse(source)
    return "\n".join(ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def _only_imports_and_show_docs(source: str) -> bool:
    "Whether a cell is imports and `show_doc(...)` calls alone (nbdev runs such a cell whole, and so do we)."
    is_show_doc = lambda n: isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "") == "show_doc"
    return all(isinstance(n, (ast.Import, ast.ImportFrom)) or is_show_doc(n) for n in ast.parse(source).body)


def patch_show_doc_runner():
    "nbdev runs every cell that imports anything to make the API docs; ours mix imports with demonstrations that need earlier cells."
    import nbdev.processors as P
    if getattr(P.exec_show_docs.__call__, "patched", False): return
    run = P.exec_show_docs.__call__
    def call(self, cell):
        if not self.nb.has_docs_ or not hasattr(self, "k") or cell.cell_type != "code": return run(self, cell)
        directives = set(cell.directives_)
        if directives & {"export", "exports", "exporti", "exec_doc"} or not P._do_eval(cell): return run(self, cell)
        try: imports, whole = _imports_only(cell.source), _only_imports_and_show_docs(cell.source)
        except SyntaxError: return run(self, cell)
        if whole: return run(self, cell)
        if imports and imports != cell.source.strip():  # a mixed cell: bring its imports in, keep its (executed) outputs
            self.k.run_cell(imports)
            if self.k.exc: raise Exception(f"Error in the imports of cell {cell.idx_}:\n{imports}") from self.k.exc
            return
        return run(self, cell)
    call.patched = True
    P.exec_show_docs.__call__ = call


def process(work: Path) -> Path:
    "nbdev's docs preparation, in process (its processors patched as above): the _proc folder with nbdev's quarto files."
    import warnings
    from nbdev.config import get_config
    from nbdev.quarto import nbdev_sidebar, refresh_quarto_yml
    from nbdev.serve import proc_nbs
    patch_show_doc_runner()
    os.chdir(work)
    get_config.cache_clear()  # nbdev caches the settings of the folder it first ran in
    refresh_quarto_yml()
    nbdev_sidebar.__wrapped__()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found cells containing imports")  # handled by the patch
        return proc_nbs(n_workers=0)  # in this process: the patch holds (workers would import nbdev afresh)


def render_quarto(work: Path, out: Path):
    "nbdev_docs' rendering step: quarto renders _proc into the configured doc_path."
    import subprocess
    subprocess.run(["quarto", "render", "--no-cache"], cwd=work / "_proc", check=True)
    shutil.copytree(work / "_proc" / "_docs", out, dirs_exist_ok=True)  # nbdev.yml: output-dir _docs, inside _proc


CSS = """body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#212529;line-height:1.5}
header{background:#2780e3;color:#fff;padding:.6em 1.2em}header a{color:#fff;text-decoration:none;font-weight:600;font-size:1.2em}
.layout{display:flex}nav{width:15em;flex:none;padding:1em;border-right:1px solid #dee2e6;font-size:.9em;position:sticky;top:0;
align-self:flex-start;max-height:100vh;overflow:auto}nav a{display:block;color:#343a40;text-decoration:none;padding:.15em 0}
nav a.active{font-weight:700;color:#2780e3}main{flex:1;min-width:0;max-width:60em;padding:1em 2em 4em}
.description{font-size:1.15em;color:#5a6570}pre{background:#f7f7f7;padding:.6em;overflow:auto;border-radius:4px;font-size:.85em}
.jp-OutputArea pre,.output pre{background:#fff;border-left:3px solid #dee2e6}img{max-width:100%}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #dee2e6;padding:.25em .6em;text-align:left}
.anchor-link{visibility:hidden;margin-left:.3em;text-decoration:none}h1:hover .anchor-link,h2:hover .anchor-link,
h3:hover .anchor-link,h4:hover .anchor-link{visibility:visible}code{font-size:.9em;color:#9753b8}pre code{color:inherit}.jp-InputPrompt,.jp-OutputPrompt{display:none}
"""


def _front_matter(nb) -> dict:
    "nbdev's front matter (title, description) from the first raw cell of a processed notebook."
    import yaml
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.startswith("---"):
            return yaml.safe_load(c.source.strip().strip("-")) or {}
    return {}


def _quarto_options(cell) -> dict:
    "A code cell's quarto options (`#| echo: false`, ...) as a dict; nbconvert does not read them."
    opts = {}
    for line in cell.source.splitlines():
        m = re.match(r"#\|\s*([\w-]+)\s*:\s*(.+)", line)
        if not m: break
        opts[m.group(1)] = m.group(2).strip().lower()
    return opts


def _pandoc_links(md: str) -> str:
    "[text](url){target=... style=...} (pandoc) as an HTML link with those attributes."
    def link(m):
        attrs = " ".join(f'{k}="{html.escape(v)}"' for k, v in re.findall(r'(\w+)="([^"]*)"', m.group(3)))
        return f'<a href="{html.escape(m.group(2))}" {attrs}>{m.group(1)}</a>'
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)\{([^}]*)\}", link, md)


def _widget_text(model_id: str, state: dict) -> str:
    "The text of a stored widget at the end of the run: tqdm's bar (an HBox of HTML, FloatProgress, HTML) as tqdm prints it."
    m = state.get(model_id)
    if not m: return ""
    st, kind = m.get("state", {}), m.get("model_name", "")
    if kind == "HBoxModel": return "".join(_widget_text(c.removeprefix("IPY_MODEL_"), state) for c in st.get("children", []))
    if kind == "HTMLModel": return html.unescape(re.sub(r"<[^>]+>", "", st.get("value", ""))).replace("\xa0", " ")
    if kind in ("FloatProgressModel", "IntProgressModel"):
        f = min(1.0, max(0.0, st.get("value", 0) / (st.get("max") or 1)))
        return "|" + "█" * round(10 * f) + " " * (10 - round(10 * f)) + "|"
    return ""


def render_nbconvert(work: Path, out: Path):
    "Each processed notebook as an HTML page with a sidebar in nbdev's order; figures and show_doc output included."
    import nbformat
    import yaml
    from nbconvert import HTMLExporter
    from pygments.formatters import HtmlFormatter
    proc = work / "_proc"
    order = [p for p in yaml.safe_load((proc / "sidebar.yml").read_text())["website"]["sidebar"]["contents"] if isinstance(p, str)]
    pages = []
    for name in order:
        nb = nbformat.read(proc / name, as_version=4)
        for c in nb.cells:
            c.pop("has_sd", None)  # nbdev's mark of a show_doc cell, not in the notebook schema (nbconvert complains)
            if c.cell_type != "code": continue
            o = _quarto_options(c)
            if o.get("include") == "false": c.source, c.outputs = "", []
            if o.get("echo") == "false": c.metadata["transient"] = {"remove_source": True}
            if o.get("output") == "false": c.outputs = []
            c.source = "\n".join(line for line in c.source.splitlines() if not line.startswith("#|"))
        widgets = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
        fm = _front_matter(nb)  # shown as the page's title and description, not as a cell
        nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and not c.source.strip() and not c.outputs)
                    and not (c.cell_type == "raw" and c.source.startswith("---"))]
        for c in nb.cells:  # show_doc's markdown uses pandoc's link attributes, which mistune does not know
            for o in c.get("outputs", []):
                if "text/markdown" in o.get("data", {}): o["data"]["text/markdown"] = _pandoc_links(o["data"]["text/markdown"])
                # a progress bar is a widget (ipywidgets) drawn by JavaScript from a CDN: a static page shows its final text
                view = o.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
                if view: o["data"]["text/plain"] = _widget_text(view.get("model_id", ""), widgets) or o["data"].get("text/plain", "")
        page = fm.get("output-file") or Path(name).with_suffix(".html").name  # nbdev's page name (serve.html), as quarto uses
        pages.append((name, page, fm.get("title") or Path(name).stem, fm.get("description", ""), nb))
    exporter = HTMLExporter(template_name="basic", exclude_input_prompt=True, exclude_output_prompt=True)
    (out / "styles.css").write_text(CSS + HtmlFormatter().get_style_defs(".highlight"))
    site = yaml.safe_load((proc / "nbdev.yml").read_text())["website"]
    site, host = site["title"], site["site-url"].rstrip("/") + "/"
    for name, page, title, desc, nb in pages:
        body, resources = exporter.from_notebook_node(nb)
        for src, dst, _, _, _ in pages:  # links between notebooks point at their pages
            body = body.replace(f'href="{src}', f'href="{dst}')
        body = body.replace(f'href="{host}', 'href="')  # nbdev's API links name the published site: here, this folder
        body = re.sub(r'(<h[1-4] id=")([^"]+)"', lambda m: m.group(1) + m.group(2).lower() + '"', body)  # nbdev's anchors
        side = "".join(f'<a href="{p}"{" class=active" if p == page else ""}>{html.escape(t)}</a>' for _, p, t, _, _ in pages)
        (out / page).write_text(
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{html.escape(title)} – {html.escape(site)}</title><link rel="stylesheet" href="styles.css"></head><body>'
            f'<header><a href="index.html">{html.escape(site)}</a></header><div class="layout"><nav>{side}</nav>'
            f'<main><h1 class="title">{html.escape(title)}</h1><p class="description">{html.escape(desc)}</p>{body}</main></div>'
            f'</body></html>', encoding="utf-8")


def build(out: Path, engine: str = "auto", execute_nbs=EXECUTE) -> str:
    "Build the site into `out`; returns the engine used ('quarto' or 'nbconvert')."
    out = Path(out).resolve(); out.mkdir(parents=True, exist_ok=True)
    engine = ("quarto" if shutil.which("quarto") else "nbconvert") if engine == "auto" else engine
    here, env = os.getcwd(), dict(os.environ)  # both restored at the end: a test runs this inside pytest
    os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the kernel is this environment's python
    with tempfile.TemporaryDirectory(prefix="tbps-docs-") as tmp:
        work = Path(tmp)
        nbs = copy_project(work)
        for name in execute_nbs:
            t0 = time.perf_counter(); execute(nbs / name); log(f"executed {name} in {time.perf_counter() - t0:.0f} s")
        try:
            t0 = time.perf_counter(); process(work); log(f"nbdev processed the notebooks in {time.perf_counter() - t0:.0f} s")
            (render_quarto if engine == "quarto" else render_nbconvert)(work, out)
        finally:
            os.chdir(here); os.environ.clear(); os.environ.update(env)
            from nbdev.config import get_config
            get_config.cache_clear()  # the copy's settings go with the copy
    log(f"{engine}: {len(list(out.glob('*.html')))} pages in {out}")
    return engine


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder for the site (index.html and a page per notebook)")
    ap.add_argument("--engine", choices=("auto", "quarto", "nbconvert"), default="auto", help="auto: quarto when installed")
    ap.add_argument("--no-execute", action="store_true", help="render stored outputs only (faster; no figures)")
    a = ap.parse_args()
    build(Path(a.out), a.engine, [] if a.no_execute else EXECUTE)
