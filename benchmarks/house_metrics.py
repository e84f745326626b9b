"""House metrics: how readable the package is, in a few figures that can be compared before and after a clean-up.

    python benchmarks/house_metrics.py [--repo DIR] [--top 5]
    python benchmarks/house_metrics.py --floors      # the rows of docs/architecture.md's floors table, from the imports

Figures (all read from the source as text or AST; nothing is imported or run):
1. largest module of `tbps_clip/` (generated `_modidx.py` and `__init__.py` left out): lines and names in `__all__`;
2. import side effects: imports kept only to register (`noqa: F401`) and registrations done at module level
   (a top-level decorator or call whose name contains `register`, also inside a top-level `for`, and a top-level
   item assignment into an upper-case table imported from another module); "into another module" counts those
   whose table or registrar is imported;
3. duplicated shapes: the pair count of a `duplicates` command on PATH (a code-clone finder; not part of the project) over
   the repository (n/a without one);
4. longest `#| export` cell in `nbs/` (code lines, directives left out), and how many have 100 lines or more;
5. function-level imports: `import` statements inside a function body in `tbps_clip/`;
6. `show_doc` calls in `nbs/`;
7. per notebook group (the study notebooks 30-35, all): the longest export cell, and the export cells with no
   demonstration (no code cell without `#| export` before the next export cell or the notebook's end), with the
   notebooks that have most of them and the export cells over 80 lines;
8. import cycles among the package's modules, edges being module-level imports, imports inside functions and
   `'tbps_clip.module:name'` strings (registries resolved on first use): each strongly connected group of modules,
   and whether it needs a function-level import or a string to close (a hidden cycle).
"""
import argparse
import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_modules(root: Path) -> list[Path]:
    "The package's hand-written (notebook-generated) modules."
    return sorted(p for p in (root / "tbps_clip").rglob("*.py") if p.name not in ("_modidx.py", "__init__.py"))


def exported_names(tree: ast.Module) -> int:
    "Length of the module's `__all__` (0 if it has none)."
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return len(ast.literal_eval(node.value))
    return 0


def largest_module(root: Path) -> tuple[str, int, int]:
    "(path, lines, exported names) of the longest module."
    best = max(package_modules(root), key=lambda p: len(p.read_text().splitlines()))
    src = best.read_text()
    return str(best.relative_to(root)), len(src.splitlines()), exported_names(ast.parse(src))


def _name(node) -> str:
    "The dotted-ish name of a call's function or a decorator (last part)."
    if isinstance(node, ast.Call): node = node.func
    if isinstance(node, ast.Attribute): return node.attr
    if isinstance(node, ast.Name): return node.id
    return ""


def _imported_names(tree: ast.Module) -> set[str]:
    "Names bound by module-level relative imports (`from .x import Y`)."
    return {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.level
            for a in n.names}


def _uses(node, names: set[str]) -> bool:
    "Whether `node` mentions any of `names`."
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(node))


def registrations(path: Path, root: Path) -> list[tuple[str, bool]]:
    "(place, into another module) for each module-level registration in `path`."
    tree = ast.parse(path.read_text())
    imported, rel, out = _imported_names(tree), str(path.relative_to(root)), []
    def visit(stmts):
        for n in stmts:
            where = f"{rel}:{n.lineno}"
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                for d in n.decorator_list:
                    if "register" in _name(d): out.append((where, _uses(d, imported)))
            elif isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and "register" in _name(n.value):
                out.append((where, _uses(n.value, imported)))
            elif isinstance(n, ast.For): visit(n.body)
            elif isinstance(n, ast.Assign):
                for t in n.targets:
                    if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id.isupper()
                            and t.value.id in imported):
                        out.append((where, True))
    visit(tree.body)
    return out


def side_effect_imports(root: Path) -> list[str]:
    "Places of imports kept only for their side effect."
    return [f"{p.relative_to(root)}:{i}" for p in package_modules(root)
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.match(r"\s*(from|import)\b", line) and "noqa: F401" in line]


def duplicate_pairs(root: Path) -> str:
    "The first line of the `duplicates` tool's report (pairs and files read)."
    exe = shutil.which("duplicates")
    if exe is None: return "n/a (no duplicates tool on PATH)"
    r = subprocess.run([exe, "--repo", str(root), "--seconds", "120"], capture_output=True, text=True)
    return r.stdout.splitlines()[0] if r.stdout else "n/a"


def export_cells(root: Path) -> list[tuple[int, str]]:
    "(code lines, notebook) for every `#| export` cell in nbs/, longest first."
    out = []
    for nb in sorted((root / "nbs").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code": continue
            lines = "".join(cell["source"]).splitlines()
            if not any(re.match(r"#\|\s*export\b", l) for l in lines[:3]): continue
            code = [l for l in lines if l.strip() and not l.startswith("#|")]
            out.append((len(code), nb.name))
    return sorted(out, reverse=True)


def function_imports(root: Path) -> list[str]:
    "Places of import statements inside function bodies in the package."
    out = []
    for p in package_modules(root):
        for f in ast.walk(ast.parse(p.read_text())):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(f):
                    if isinstance(n, (ast.Import, ast.ImportFrom)): out.append(f"{p.relative_to(root)}:{n.lineno}")
    return sorted(set(out))


def show_doc_calls(root: Path) -> int:
    "Number of `show_doc(` calls in nbs/ code cells."
    return sum("".join(c["source"]).count("show_doc(") for nb in (root / "nbs").glob("*.ipynb")
               for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")


def undemonstrated(root: Path, pattern: str = "*.ipynb") -> tuple[int, int, int]:
    "(longest export cell, export cells with no demonstration after them, export cells) over nbs/`pattern`."
    longest, bare, total = 0, 0, 0
    for nb in sorted((root / "nbs").glob(pattern)):
        code = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        kinds = []
        for c in code:
            lines = "".join(c["source"]).splitlines()
            exp = any(re.match(r"#\|\s*export\b", l) for l in lines[:3])
            if any(l.startswith("#| default_exp") for l in lines[:3]): continue
            kinds.append(exp)
            if exp: longest = max(longest, len([l for l in lines if l.strip() and not l.startswith("#|")]))
        for i, exp in enumerate(kinds):
            if not exp or i == 0: continue  # the first export cell holds the imports
            total += 1
            if i + 1 == len(kinds) or kinds[i + 1]: bare += 1
    return longest, bare, total


def module_name(path: Path, root: Path) -> str:
    "Dotted module name of a package file (`tbps_clip/study/grid.py` -> `tbps_clip.study.grid`)."
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_target(node, package: str, modules: set[str]) -> list[str]:
    "Package modules an import node names (a `from pkg import mod` names the submodule when there is one); `package`: the one a relative import starts from."
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    base = package.split(".")
    base = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
    mod = ".".join(x for x in (base, node.module or "") if x)
    subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
    return subs or ([mod] if mod in modules else [])


def _package_files(root: Path) -> dict[str, Path]:
    "{dotted module name: file} of every module of the package (a package's `__init__.py` under the package's name)."
    return {module_name(p, root): p for p in (root / "tbps_clip").rglob("*.py") if p.name != "_modidx.py"}


def module_strings(root: Path) -> list[tuple[str, str, str | None]]:
    "(holder, string, module it names or None) for every `'tbps_clip.module:name'` string constant of the package."
    files = _package_files(root)
    out = []
    for here, p in files.items():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"tbps_clip(\.\w+)*:\w+", n.value):
                mod = n.value.split(":")[0]
                out.append((here, n.value, mod if mod in files else None))
    return out


def import_edges(root: Path) -> list[tuple[str, str, str]]:
    "(from, to, kind) for every dependency between package modules; kind: module (a top-level import), function or string."
    files = _package_files(root)
    modules, edges = set(files), set()
    for here, p in files.items():
        package = here if p.name == "__init__.py" else here.rpartition(".")[0]
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                kind = "module" if id(n) in top else "function"
                edges |= {(here, t, kind) for t in _import_target(n, package, modules) if t != here}
    edges |= {(h, m, "string") for h, _, m in module_strings(root) if m and m != h}
    return sorted(edges)


def floors(root: Path) -> dict[str, int]:
    """Each module's floor over the import edges (strings aside): 0 for one that imports no other module of the package,
    else one above the highest it imports; packages whose `__init__.py` is empty are left out. A cycle is an error."""
    files = _package_files(root)
    below = {m: set() for m in files}
    for a, b, kind in import_edges(root):
        if kind != "string": below[a].add(b)
    out: dict = {}
    def floor(m):
        if m not in out:
            out[m] = None  # a cycle would come back here
            under = [floor(t) for t in below[m]]
            if None in under: raise ValueError(f"import cycle through {m}")
            out[m] = 1 + max(under, default=-1)
        return out[m]
    for m in files: floor(m)
    return {m: f for m, f in out.items() if files[m].name != "__init__.py" or files[m].read_text().strip()}


def floors_table(root: Path) -> str:
    "The rows of docs/architecture.md's floors table (highest floor first), as `--floors` prints them."
    by: dict = {}
    for m, f in floors(root).items(): by.setdefault(f, []).append(m)
    short = lambda m: m if m == "tbps_clip" else m.removeprefix("tbps_clip.")
    return "\n".join(f"| {f} | " + ", ".join(f"`{short(m)}`" for m in sorted(by[f])) + " |" for f in sorted(by, reverse=True))


def strongly_connected(nodes, succ) -> list[list[str]]:
    "Tarjan's strongly connected components of a graph (`succ`: node -> successors), those of two or more nodes."
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in succ.get(v, ()):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in sorted(nodes):
        if v not in index: visit(v)
    return out


def import_cycles(root: Path) -> list[tuple[list[str], list[str]]]:
    "(modules, the function-level and string edges inside) of each group of modules that import each other."
    edges = import_edges(root)
    succ = {}
    for a, b, _ in edges: succ.setdefault(a, set()).add(b)
    nodes = {a for a, _, _ in edges} | {b for _, b, _ in edges}
    out = []
    for comp in strongly_connected(nodes, succ):
        inside = [f"{a.split('.', 1)[1]} -> {b.split('.', 1)[1]} ({k})" for a, b, k in edges
                  if a in comp and b in comp and k != "module"]
        out.append(([c.split(".", 1)[1] for c in comp], inside))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=ROOT)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--floors", action="store_true", help="print only the rows of docs/architecture.md's floors table")
    a = ap.parse_args()
    root = a.repo.resolve()
    if a.floors: print(floors_table(root)); return
    mod, lines, names = largest_module(root)
    print(f"largest module: {mod}: {lines} lines, {names} exported names")
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in package_modules(root)),
                   reverse=True)
    print("  next: " + ", ".join(f"{m} {n}" for n, m in sizes[1:a.top]))
    imps = side_effect_imports(root)
    regs = [r for p in package_modules(root) for r in registrations(p, root)]
    cross = [w for w, x in regs if x]
    print(f"import side effects: {len(imps) + len(regs)} ({len(imps)} imports kept only to register, "
          f"{len(regs)} module-level registrations, {len(cross)} of them into another module's table)")
    print("  noqa F401: " + (", ".join(imps) or "none"))
    print("  into another module: " + (", ".join(cross) or "none"))
    print("  own tables: " + (", ".join(w for w, x in regs if not x) or "none"))
    print(f"duplicated shapes: {duplicate_pairs(root)}")
    cells = export_cells(root)
    print(f"longest export cell: {cells[0][0]} lines ({cells[0][1]}); export cells >= 100 lines: "
          f"{sum(n >= 100 for n, _ in cells)} of {len(cells)}")
    print("  next: " + ", ".join(f"{n} ({nb})" for n, nb in cells[1:a.top]))
    fi = function_imports(root)
    print(f"function-level imports: {len(fi)}")
    per = {}
    for w in fi: per[w.split(":")[0]] = per.get(w.split(":")[0], 0) + 1
    print("  by module: " + ", ".join(f"{m} {n}" for m, n in sorted(per.items(), key=lambda kv: -kv[1])))
    print(f"show_doc calls in nbs/: {show_doc_calls(root)}")
    for label, pat in (("study notebooks 30-35", "3[0-5]*_study_*.ipynb"), ("10_evaluate", "10_evaluate.ipynb"),
                       ("all notebooks", "*.ipynb")):
        longest, bare, total = undemonstrated(root, pat)
        print(f"{label}: longest export cell {longest} lines; {bare} of {total} export cells (imports aside) "
              "with no demonstration after them")
    worst = sorted(((undemonstrated(root, nb.name)[1], nb.name) for nb in (root / "nbs").glob("*.ipynb")), reverse=True)
    print("  most: " + ", ".join(f"{nb} {n}" for n, nb in worst[:a.top] if n))
    long80 = [(n, nb) for n, nb in cells if n > 80]
    print(f"export cells over 80 lines: {len(long80)}" + (": " + ", ".join(f"{nb} {n}" for n, nb in long80) if long80 else ""))
    cyc = import_cycles(root)
    hidden = [c for c in cyc if c[1]]
    print(f"import cycles (strings and function-level imports counted): {len(cyc)} group(s), {len(hidden)} closed only "
          "by a function-level import or a string")
    for mods, inside in cyc:
        print(f"  {' <-> '.join(mods)}: " + ("; ".join(inside) if inside else "module-level imports only"))


if __name__ == "__main__":
    main()
