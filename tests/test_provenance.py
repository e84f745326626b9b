"""Every committed result names code that is in the repository's history: each record's commit is an ancestor of HEAD,
or it is a commit the results folder declares lost (its `provenance.json`), with the reruns that show what it trained."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _commits(obj):
    "Every commit named in a record (`git_commit`, at any depth)."
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "git_commit" and isinstance(v, str): yield v
            else: yield from _commits(v)
    elif isinstance(obj, list):
        for v in obj: yield from _commits(v)


def _declared_lost(path: Path) -> dict:
    "The commits declared lost by the `provenance.json` of the results folder that holds `path`, if any."
    for folder in path.parents:
        f = folder / "provenance.json"
        if f.is_file(): return json.loads(f.read_text())["lost_commits"]
        if folder == ROOT: break
    return {}


@pytest.fixture(scope="module")
def history():
    if _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true": pytest.skip("not a git checkout")
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true": pytest.skip("a shallow clone lacks the history")
    reachable = set(_git("rev-list", "HEAD").stdout.split())
    assert reachable, "git rev-list HEAD listed no commit"
    return reachable


def test_every_committed_record_names_a_commit_in_the_history(history):
    tracked = [ROOT / p for p in _git("ls-files", "results", "benchmarks/results").stdout.split() if p.endswith(".json")]
    assert len(tracked) > 300  # the study records are among them
    named, unexplained = 0, {}
    for path in tracked:
        lost = _declared_lost(path)
        for c in _commits(json.loads(path.read_text())):
            named += 1
            if c not in history and c not in lost: unexplained.setdefault(c, []).append(str(path.relative_to(ROOT)))
    assert named > 300
    assert not unexplained, {c: (len(ps), ps[:3]) for c, ps in unexplained.items()}


def test_declared_lost_commits_are_explained_and_rerun(history):
    """A lost commit is named in its folder's report with what it was; one of its records was rerun on one machine at two
    commits of the history, and the two reruns agree in every metric (the code trains alike)."""
    files = [ROOT / p for p in _git("ls-files", "results").stdout.split() if p.endswith("provenance.json")]
    assert files, "results/study/synthpedes-v3 declares its lost commits"
    for f in files:
        prov = json.loads(f.read_text())
        assert prov["lost_commits"] and all(len(c) == 40 and why for c, why in prov["lost_commits"].items())
        report = (f.parent / "report" / "report.md").read_text()
        assert all(c in report for c in prov["lost_commits"]), "the report must say which commits are lost"
        reruns = json.loads((f.parent / prov["reruns"]).read_text())["reruns"]
        for lost in prov["lost_commits"]:
            mine = [r for r in reruns if r["record_commit"] == lost]
            by_record = {}
            for r in mine: by_record.setdefault(r["record"], []).append(r)
            pairs = [rs for rs in by_record.values() if len({r["rerun_commit"] for r in rs}) >= 2]
            assert pairs, f"{lost[:8]}: no record of it was rerun at two commits"
            for rs in pairs:
                assert all(r["rerun_commit"] in history for r in rs)
                assert all(r["rerun_metrics"] == rs[0]["rerun_metrics"] for r in rs), f"{lost[:8]}: the reruns differ"
