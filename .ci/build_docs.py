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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the notebooks whose figures and printed results belong in the docs: the front page, the tutorial, and the module
# notebooks that show figures (SynthPEDES samples and drawings, its captions, the pretraining corpus, the evaluation
# figure) or search results; ~10 s each on a CPU
EXECUTE = ["index.ipynb", "22_search_tutorial.ipynb", "03_synthpedes.ipynb", "03b_synthpedes_drawing.ipynb",
           "03c_synthpedes_captions.ipynb", "12a_pretrain_corpus.ipynb", "10_evaluate.ipynb", "20_search.ipynb"]


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


STYLESHEET = "pages.css"  # the pages written here (quarto's own pages have their styles.css)
CSS = """body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#212529;line-height:1.5}
header{background:#2780e3;color:#fff;padding:.6em 1.2em}header a{color:#fff;text-decoration:none;font-weight:600;font-size:1.2em}
.layout{display:flex}nav{width:15em;flex:none;padding:1em;border-right:1px solid #dee2e6;font-size:.9em;position:sticky;top:0;
align-self:flex-start;max-height:100vh;overflow:auto}nav a{display:block;color:#343a40;text-decoration:none;padding:.15em 0}
nav a.active{font-weight:700;color:#2780e3}main{flex:1;min-width:0;max-width:60em;padding:1em 2em 4em}
.description{font-size:1.15em;color:#5a6570}pre{background:#f7f7f7;padding:.6em;overflow:auto;border-radius:4px;font-size:.85em}
.jp-OutputArea pre,.output pre{background:#fff;border-left:3px solid #dee2e6}img{max-width:100%}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #dee2e6;padding:.25em .6em;text-align:left}
.anchor-link{visibility:hidden;margin-left:.3em;text-decoration:none}h1:hover .anchor-link,h2:hover .anchor-link,
h3:hover .anchor-link,h4:hover .anchor-link{visibility:visible}nav p.group{margin:1em 0 .2em;font-weight:700;color:#6c757d;
font-size:.8em;text-transform:uppercase}a[data-unlinked]{color:inherit}.linenos{color:#999;user-select:none}code{font-size:.9em;color:#9753b8}pre code{color:inherit}.jp-InputPrompt,.jp-OutputPrompt{display:none}
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


def notebook_pages(proc: Path) -> list:
    "The processed notebooks in nbdev's sidebar order: (notebook, page, title, description, notebook node)."
    import nbformat
    import yaml
    order = [p for p in yaml.safe_load((proc / "sidebar.yml").read_text())["website"]["sidebar"]["contents"] if isinstance(p, str)]
    pages = []
    for name in order:
        nb = nbformat.read(proc / name, as_version=4)
        fm = _front_matter(nb)  # shown as the page's title and description, not as a cell
        page = fm.get("output-file") or Path(name).with_suffix(".html").name  # nbdev's page name (serve.html), as quarto uses
        pages.append((name, page, fm.get("title") or Path(name).stem, fm.get("description", ""), nb))
    return pages


def render_nbconvert(work: Path, out: Path) -> list:
    "Each processed notebook as the body of an HTML page (figures and show_doc output included): a list of `Page`s."
    from nbconvert import HTMLExporter
    pages = []
    exporter = HTMLExporter(template_name="basic", exclude_input_prompt=True, exclude_output_prompt=True)
    nb_pages = notebook_pages(work / "_proc")
    for name, page, title, desc, nb in nb_pages:
        for c in nb.cells:
            c.pop("has_sd", None)  # nbdev's mark of a show_doc cell, not in the notebook schema (nbconvert complains)
            if c.cell_type != "code": continue
            o = _quarto_options(c)
            if o.get("include") == "false": c.source, c.outputs = "", []
            if o.get("echo") == "false": c.metadata["transient"] = {"remove_source": True}
            if o.get("output") == "false": c.outputs = []
            c.source = "\n".join(line for line in c.source.splitlines() if not line.startswith("#|"))
        widgets = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
        nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and not c.source.strip() and not c.outputs)
                    and not (c.cell_type == "raw" and c.source.startswith("---"))]
        for c in nb.cells:  # show_doc's markdown uses pandoc's link attributes, which mistune does not know
            for o in c.get("outputs", []):
                if "text/markdown" in o.get("data", {}): o["data"]["text/markdown"] = _pandoc_links(o["data"]["text/markdown"])
                # a progress bar is a widget (ipywidgets) drawn by JavaScript from a CDN: a static page shows its final text
                view = o.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
                if view: o["data"]["text/plain"] = _widget_text(view.get("model_id", ""), widgets) or o["data"].get("text/plain", "")
        body, _ = exporter.from_notebook_node(nb)
        for src, dst, _, _, _ in nb_pages:  # links between notebooks point at their pages
            body = body.replace(f'href="{src}', f'href="{dst}')
        body = re.sub(r'(<h[1-4] id=")([^"]+)"', lambda m: m.group(1) + m.group(2).lower() + '"', body)  # nbdev's anchors
        pages.append(Page(page, title, desc, body, origin="nbs", notebook=name))
    return pages


# ---- the whole site: guides, source pages, links ------------------------------------------------------------------
# Every page of docs/ is a page of the site at the same path (docs/study.md -> docs/study.html), and so is every
# Markdown file of the repository those pages link to (experiments/README.md, ...). Each module's source is a page under
# src/ (src/tbps_clip/serve.py.html, a line's anchor L<n>), where the API docs' "source" links lead while settings.ini
# names no public repository (its git_url is an .invalid placeholder). A link to another file of the repository copies
# that file into the site at the same path; a link to a folder is kept only with a repository to point at. Every link
# of every page is then made relative, and a link whose page or anchor cannot be found is reported.

GUIDES = ["study.md", "synthpedes.md", "real-data.md", "fidelity.md", "performance.md", "architecture.md"]  # sidebar order; others follow


@dataclass
class Page:
    "One HTML page of the site: its path in the site, title, description, body, and the repository folder its links are relative to."
    path: str
    title: str
    description: str
    body: str
    origin: str = ""  # repository folder the body's relative links start from
    notebook: str = ""  # the notebook it was made from
    whole: bool = False  # the body is a whole HTML document (quarto's): links are fixed, nothing is wrapped


def _settings(work: Path) -> dict:
    "settings.ini's values."
    import configparser
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(work / "settings.ini")
    return dict(cp["DEFAULT"])


def repository_url(settings: dict) -> str | None:
    "The public repository's address (settings.ini's git_url), or None when it names none (empty, or an .invalid host)."
    from urllib.parse import urlsplit
    host = urlsplit(settings.get("git_url", "")).hostname or ""
    return None if not host or host == "invalid" or host.endswith(".invalid") else settings["git_url"].rstrip("/")


def _slug(text: str, seen: dict) -> str:
    "A heading's anchor as GitHub makes it (lower case, punctuation dropped, spaces to hyphens; repeats numbered)."
    s = re.sub(r"[^\w\- ]", "", html.unescape(re.sub(r"<[^>]+>", "", text)).strip().lower()).replace(" ", "-")
    n = seen.get(s, 0); seen[s] = n + 1
    return s if n == 0 else f"{s}-{n}"


def render_markdown(path: Path) -> Page:
    "A Markdown file of the repository as a page at its own path (.md -> .html); heading anchors as on a git host."
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    rel = path.relative_to(ROOT).as_posix()
    text = path.read_text(encoding="utf-8")
    m = re.match(r"#\s+(.+)\n", text)
    title, text = (m.group(1).strip(), text[m.end():]) if m else (path.stem, text)
    body, seen = markdown2html_mistune(text), {}
    def heading(m):
        slug = _slug(m.group(3), seen)
        return f'<h{m.group(1)} id="{slug}">{m.group(3)}<a class="anchor-link" href="#{slug}">&#182;</a></h{m.group(1)}>'
    body = re.sub(r'<h([1-6]) id="([^"]*)">(.*?)<a class="anchor-link" href="#[^"]*">&#182;</a></h\1>', heading, body, flags=re.S)
    return Page(rel[:-3] + ".html", re.sub(r"`([^`]*)`", r"\1", title), "", body, origin=str(Path(rel).parent))


def render_source(module: Path, module_pages: dict) -> Page:
    "A module's source, highlighted, one anchor per line (L1, L2, ...), with a link to its notebook's page."
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    rel = module.relative_to(ROOT).as_posix()
    code = highlight(module.read_text(encoding="utf-8"), PythonLexer(), HtmlFormatter(linenos="inline", linespans="L"))
    code = re.sub(r'<span id="L-(\d+)">', r'<span id="L\1">', code)
    code = re.sub(r">[^<]+<", lambda m: m.group(0).replace('"', "&quot;"), code)  # the code's own quotes are text, not markup
    page = module_pages.get(rel)
    intro = (f'<p>Generated by <code>nbdev_export</code> from the notebook of <a href="{"../" * rel.count("/")}../{page}">its page</a>; '
             "edit the notebook, not this file.</p>" if page else "")
    return Page(f"src/{rel}.html", rel, "source", intro + code)


def _module_pages(work: Path, nb_pages: list) -> dict:
    "Module file (tbps_clip/serve.py) -> the site page of the notebook it is exported from."
    out = {}
    for name, page, *_ in nb_pages:
        text = (work / "nbs" / name).read_text(encoding="utf-8")
        m = re.search(r"#\|\s*default_exp\s+([\w.]+)", text)
        if m: out[f"tbps_clip/{m.group(1).replace('.', '/')}.py"] = page
    return out


def _def_line(module: Path, name: str) -> int | None:
    "The line where `module` defines `name` (a function, class or assignment; case-insensitive), or None."
    tree = ast.parse(module.read_text(encoding="utf-8"))
    for n in ast.walk(tree):
        names = [n.name] if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(n, "targets", []) if isinstance(t, ast.Name)]
        if any(x.lower() == name.lower() for x in names): return n.lineno
    return None


class Linker:
    "Resolves every link of the site's pages (see the comment above); what it drops is in `dropped` as (page, href, why)."
    def __init__(self, out: Path, pages: dict, nb_pages: list, module_pages: dict, settings: dict):
        self.out, self.pages, self.module_pages = out, pages, module_pages
        self.notebooks = {f"nbs/{name}": page for name, page, *_ in nb_pages}
        self.page_module = {page: mod for mod, page in module_pages.items()}
        self.repo = repository_url(settings)
        self.branch = settings.get("branch", "main")
        self.blob = settings.get("git_url", "").rstrip("/") + f"/blob/{self.branch}/"
        self.host = (settings.get("doc_host", "").rstrip("/") + "/" + settings.get("doc_baseurl", "/").strip("/")).rstrip("/") + "/"
        self.ids = {}
        self.dropped, self.copied, self.checked = [], [], 0

    def repo_target(self, origin: str, path: str) -> str | None:
        "A relative link of a page from repository folder `origin`, as a repository path (None: outside the repository)."
        p = os.path.normpath(os.path.join(origin, path)).replace(os.sep, "/")
        return None if p.startswith("..") or os.path.isabs(p) else p

    def md_links(self, page: Page) -> list:
        "The repository Markdown files `page` links to (for the closure of pages)."
        found = []
        for h in re.findall(r'href="([^"#:]+\.md)(?:#[^"]*)?"', page.body):
            p = self.repo_target(page.origin, html.unescape(h))
            if p and (ROOT / p).is_file(): found.append(p)
        return found

    def page_ids(self, path: str) -> set:
        if path not in self.ids:
            text = self.pages[path].body if path in self.pages else (self.out / path).read_text(encoding="utf-8")
            self.ids[path] = set(re.findall(r'\bid="([^"]+)"', text)) | set(re.findall(r'\bname="([^"]+)"', text))
        return self.ids[path]

    def site_target(self, page: Page, href: str):
        "(site path, fragment) of a link, or (None, why) when it leads nowhere in the site; None: leave it as it is."
        from urllib.parse import unquote, urlsplit
        u = urlsplit(html.unescape(href))
        frag = unquote(u.fragment)
        if self.repo is None and self.blob and href.startswith(self.blob):  # an API "source" link: the module's page here
            return f"src/{unquote(u.path)[len(urlsplit(self.blob).path):]}.html", frag
        if u.scheme in ("http", "https") and self.host != "/" and href.startswith(self.host):  # nbdev names the published site
            return unquote(href[len(self.host):].split("#")[0]) or "index.html", frag
        if u.scheme or href.startswith("//"): return None  # another site: kept
        if not u.path: return page.path, frag
        here = os.path.dirname(page.path)
        site = os.path.normpath(os.path.join(here, unquote(u.path))).replace(os.sep, "/")
        if site in self.pages or (self.out / site).is_file(): return site, frag
        repo = self.repo_target(page.origin, unquote(u.path))
        if repo is None: return None, "outside the repository"
        if repo in self.notebooks: return self.notebooks[repo], frag
        if repo.endswith(".md") and repo[:-3] + ".html" in self.pages: return repo[:-3] + ".html", frag
        if f"src/{repo}.html" in self.pages: return f"src/{repo}.html", frag
        f = ROOT / repo
        if f.is_file():
            dst = self.out / repo
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, dst); self.copied.append(repo)
            return repo, frag
        if f.is_dir(): return (None, "folder") if self.repo is None else None
        return None, "missing"

    def fix_anchor(self, page: Page, target: str, frag: str):
        "The anchor as it is on the target page, a fallback (the heading's case, the class of an attribute, the source line), or None."
        if not target.endswith(".html"): return target, frag
        ids = self.page_ids(target)
        if frag in ids: return target, frag
        if frag.lower() in ids: return target, frag.lower()
        if "." in frag and frag.split(".")[0] in ids: return target, frag.split(".")[0]  # galleryindex.file -> galleryindex
        mod = self.page_module.get(target)
        line = _def_line(ROOT / mod, frag) if mod and (ROOT / mod).is_file() else None
        if line and f"src/{mod}.html" in self.pages: return f"src/{mod}.html", f"L{line}"  # a private name: its definition
        return None

    def link(self, page: Page, m) -> str:
        attr, href = m.group(1), m.group(2)
        if href.startswith(("data:", "mailto:", "javascript:")): return m.group(0)
        self.checked += 1
        res = self.site_target(page, href)
        if res is None:
            if self.repo is None and "example.invalid" in href: self.dropped.append((page.path, href, "placeholder host"))
            return m.group(0)
        target, frag = res
        if target is None:
            self.dropped.append((page.path, href, frag))
            return f'data-unlinked="{href}"' if attr == "href" else m.group(0)
        if frag:
            fixed = self.fix_anchor(page, target, frag)
            if fixed is None:
                self.dropped.append((page.path, href, "anchor")); return f'data-unlinked="{href}"'
            target, frag = fixed
        rel = os.path.relpath(target, os.path.dirname(page.path) or ".").replace(os.sep, "/")
        if rel == os.path.basename(page.path) and frag and target == page.path: rel = ""
        return f'{attr}="{html.escape(rel, quote=True)}{"#" + html.escape(frag, quote=True) if frag else ""}"'

    def relink(self, page: Page) -> str:
        return re.sub(r'\b(href|src)="([^"]*)"', lambda m: self.link(page, m), page.body)


def _nav(entries: list, path: str) -> str:
    "The sidebar: (group, [(site path, title)]) entries, links relative to `path`."
    up = "../" * path.count("/")
    out = []
    for group, items in entries:
        if group: out.append(f'<p class="group">{html.escape(group)}</p>')
        out += [f'<a href="{up}{p}"{" class=active" if p == path else ""}>{html.escape(t)}</a>' for p, t in items]
    return "".join(out)


def write_page(out: Path, page: Page, body: str, site: str, nav: list):
    "The page in the site's frame: header, sidebar, title and description."
    up = "../" * page.path.count("/")
    f = out / page.path
    f.parent.mkdir(parents=True, exist_ok=True)
    desc = f'<p class="description">{html.escape(page.description)}</p>' if page.description else ""
    f.write_text(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(page.title)} – {html.escape(site)}</title><link rel="stylesheet" href="{up}{STYLESHEET}"></head><body>'
        f'<header><a href="{up}index.html">{html.escape(site)}</a></header><div class="layout"><nav>{_nav(nav, page.path)}</nav>'
        f'<main><h1 class="title">{html.escape(page.title)}</h1>{desc}{body}</main></div>'
        f'</body></html>', encoding="utf-8")


def finish_site(work: Path, out: Path, pages: list) -> dict:
    "Add the guides and the source pages to the notebook pages, resolve every link, and write the pages; returns the link report."
    import yaml
    from pygments.formatters import HtmlFormatter
    settings = _settings(work)
    nb_pages = notebook_pages(work / "_proc")
    site = yaml.safe_load((work / "_proc" / "nbdev.yml").read_text())["website"]["title"]
    if not pages:  # quarto wrote the notebook pages: their links are fixed in place
        pages = [Page(p.relative_to(out).as_posix(), "", "", p.read_text(encoding="utf-8"), origin="nbs", whole=True)
                 for p in sorted(out.glob("*.html"))]
    module_pages = _module_pages(work, nb_pages)
    byp = {p.path: p for p in pages}
    order = {name: i for i, name in enumerate(GUIDES)}
    guides = [render_markdown(f) for f in sorted((ROOT / "docs").glob("*.md"), key=lambda f: (order.get(f.name, len(order)), f.name))]
    for g in guides: byp[g.path] = g
    for mod in sorted((ROOT / "tbps_clip").rglob("*.py")):
        s = render_source(mod, module_pages); byp[s.path] = s
    linker = Linker(out, byp, nb_pages, module_pages, settings)
    todo = [p for p in byp.values() if not p.path.startswith("src/")]
    while todo:  # the Markdown files the pages link to are pages too
        for md in linker.md_links(todo.pop()):
            if md[:-3] + ".html" not in byp:
                byp[md[:-3] + ".html"] = p = render_markdown(ROOT / md); todo.append(p)
    nav = [("", [(p, t) for _, p, t, _, _ in nb_pages]), ("Guides", [(g.path, g.title) for g in guides])]
    (out / STYLESHEET).write_text(CSS + HtmlFormatter().get_style_defs(".highlight"))
    for p in byp.values():
        body = linker.relink(p)
        if p.whole: (out / p.path).write_text(body, encoding="utf-8")
        else: write_page(out, p, body, site, nav)
    report = dict(pages=len(byp), links=linker.checked, dropped=linker.dropped, copied=linker.copied)
    log(f"{report['links']} links in {report['pages']} pages; {len(linker.copied)} files copied; "
        f"{len(linker.dropped)} dropped" + "".join(f"\n  {p}: {h} ({why})" for p, h, why in linker.dropped))
    return report


def build(out: Path, engine: str = "auto", execute_nbs=EXECUTE) -> dict:
    "Build the site into `out`; returns the engine used ('quarto' or 'nbconvert') and the link report (`finish_site`)."
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
            pages = render_nbconvert(work, out) if engine == "nbconvert" else render_quarto(work, out) or []
            report = finish_site(work, out, pages)
        finally:
            os.chdir(here); os.environ.clear(); os.environ.update(env)
            from nbdev.config import get_config
            get_config.cache_clear()  # the copy's settings go with the copy
    log(f"{engine}: {len(list(out.rglob('*.html')))} pages in {out}")
    return dict(engine=engine, **report)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder for the site (index.html and a page per notebook)")
    ap.add_argument("--engine", choices=("auto", "quarto", "nbconvert"), default="auto", help="auto: quarto when installed")
    ap.add_argument("--no-execute", action="store_true", help="render stored outputs only (faster; no figures)")
    a = ap.parse_args()
    build(Path(a.out), a.engine, [] if a.no_execute else EXECUTE)
