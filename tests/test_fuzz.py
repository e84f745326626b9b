"""Property-based fuzzing of every annotation reader and of the caption pipeline (Hypothesis).

Each generated annotation file is built from entries that are either valid (with awkward but legal content: control
characters, mixed scripts, 10,000-word captions, extreme ids) or carry exactly one known defect. The oracle: a file
without defects is read with every entry, unchanged and in order (no silently changed count); a file with defects
raises a TBPSError that names the file and the first defective entry. Anything else (a crash from deep inside, a
defect accepted) fails the test. The number of generated inputs per test is printed at the end of the module.
"""
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tbps_clip.core import TBPSError
from tbps_clip.datasets import IMAGE_DIR, load_annotations, raw_formats, read_dataset, reader as dataset_reader
from tbps_clip.annotations import FORMAT, FORMAT_VERSION, read_annotations
from tbps_clip.text import EOT_TOKEN, SOT_TOKEN, _PUNCT, clean_caption, tokenize, vocab_size

# TBPS_FUZZ_EXAMPLES scales every test up for a longer local fuzzing session (random seeds then, not derandomised).
SCALE = float(os.environ.get("TBPS_FUZZ_EXAMPLES", "1"))
FUZZ = settings(max_examples=int(150 * SCALE), deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
TRIED = Counter()  # test name -> generated inputs run


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    "Print how many generated inputs each fuzz test ran (visible in the pytest output, also under -q)."
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"fuzz inputs tried: {name} {n}" for name, n in sorted(TRIED.items())]
    if tr is not None:
        tr.write_line("")
        for line in lines: tr.write_line(line)
    out = os.environ.get("TBPS_FUZZ_COUNTS")
    if out: Path(out).write_text(json.dumps(dict(TRIED), indent=1))


# --- content: legal but awkward, and known defects ---------------------------------------------------------------

AWKWARD = ["tab\tand\nnewline", "\x1b[31mred\x1b[0m jacket", "Ünïcödé 漢字 عربى кириллица", "\u202eright-to-left override",
           "nul\x00inside", "lone \ud800 surrogate", "zero\u200bwidth", "  padded  ", "emoji 👕👖", "a.b,c!d(e)f"]
WORD = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
CAPTION = st.one_of(
    st.sampled_from(AWKWARD),
    st.lists(WORD, min_size=1, max_size=30).map(" ".join),
    st.just(" ".join(["word"] * 10_000)),  # a 10,000-word caption
    st.text(min_size=1, max_size=200),
).filter(lambda c: c.strip() and clean_caption(c, 1))  # a caption needs at least one word once cleaned
PID = st.one_of(st.integers(-5, 50), st.sampled_from([0, -1, 2**63 - 1, -2**63, 10**12]))
NAME = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00"), min_size=1, max_size=20)

BAD_PID = ["7", 7.0, None, True, False, [1], {"a": 1}, 2**64, -2**64, "x", float("nan")]
BAD_SPLIT = ["dev", "", None, 1, ["train"], "TRAIN", " train"]
BAD_IMAGE = ["", "   ", "../x.jpg", "/etc/passwd", "a/../../b.jpg", "a\x00b.jpg", 5, None, "..\\x.jpg", "C:/x.jpg",
             "lone\ud800.jpg", ["a.jpg"]]
BAD_CAPTIONS = [[], "a string", [1], [None], ["ok", ""], ["   "], ["!!!"], {"a": 1}, None, ["fine", 3]]


def bad_bt(n):
    "Back-translation lists that cannot go with `n` captions."
    return [["x"] * (n + 1), "a string", [1] * n, ["  "] * n, None]


# --- generated datasets --------------------------------------------------------------------------------------------

@st.composite
def dataset(draw, kind: str):
    """(entries as the file holds them, expected records, index of the first defective entry or None, defect name).

    kind: 'normalised' or a raw format name ('cuhk-pedes', 'icfg-pedes', 'rstpreid', 'official')."""
    formats = raw_formats()
    splits = formats[kind].splits if kind in formats else ("train", "val", "test")
    img_key, pid_key = ("image", "pid") if kind == "normalised" else (formats.get(kind, formats["cuhk-pedes"]).path_field, "id")
    n = draw(st.integers(1, 8))
    pids = draw(st.lists(PID, min_size=n, max_size=n))
    split_of = {}
    for p in pids: split_of.setdefault(p, draw(st.sampled_from(splits)))
    good = []
    for i, p in enumerate(pids):
        caps = draw(st.lists(CAPTION, min_size=1, max_size=3))
        rec = dict(image=f"im{i}/{draw(NAME)}.jpg", pid=p, split=split_of[p], captions=caps,
                   captions_bt=draw(st.one_of(st.just([]), st.lists(CAPTION, min_size=len(caps), max_size=len(caps)))))
        good.append(rec)
    if kind == "official":  # the authors' files hold one split each: entries are grouped by file
        good.sort(key=lambda r: splits.index(r["split"]))
    raw = []
    for r in good:
        e = {img_key: r["image"], pid_key: r["pid"], "captions": list(r["captions"])}
        if kind != "official": e["split"] = r["split"]
        if r["captions_bt"]: e["captions_bt"] = list(r["captions_bt"])
        if kind in ("cuhk-pedes", "icfg-pedes"): e["processed_tokens"] = [c.split()[:5] for c in r["captions"]]
        raw.append(e)
    defect = draw(st.sampled_from(["none", "entry", "entry", "duplicate_image", "shared_id"]))
    if defect == "entry":
        i = draw(st.integers(0, n - 1))
        e = raw[i]
        what = draw(st.sampled_from(["missing", "pid", "image", "captions", "bt"] + (["split"] if kind != "official" else [])
                                    + (["unknown_field"] if kind == "normalised" else [])))
        if what == "missing":
            e.pop(draw(st.sampled_from([img_key, pid_key, "captions"] + (["split"] if kind != "official" else []))))
        elif what == "pid": e[pid_key] = draw(st.sampled_from(BAD_PID))
        elif what == "split": e["split"] = draw(st.sampled_from(BAD_SPLIT + (["val"] if kind == "icfg-pedes" else [])))
        elif what == "image": e[img_key] = draw(st.sampled_from(BAD_IMAGE))
        elif what == "captions": e["captions"] = draw(st.sampled_from(BAD_CAPTIONS))
        elif what == "bt": e["captions_bt"] = draw(st.sampled_from(bad_bt(len(e["captions"]))))
        else: e["note"] = "a field the format does not have"
        return raw, good, i, f"{what}"
    if defect == "duplicate_image" and n > 1:
        i, j = sorted(draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True)))
        raw[j][img_key] = draw(st.sampled_from([raw[i][img_key], raw[i][img_key].replace("/", "//", 1),
                                                "./" + raw[i][img_key]]))
        return raw, good, None, "duplicate_image"
    if defect == "shared_id" and n > 1 and len(splits) > 1:
        i, j = sorted(draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True)))
        if good[i]["split"] != good[j]["split"]:
            raw[j][pid_key] = raw[i][pid_key]
            return raw, good, None, "shared_id"
    return raw, good, None, "none"


def expected(records):
    return [(r["image"], r["pid"], r["split"], r["captions"], r["captions_bt"]) for r in records]


def got(ann):
    return [(r.image, r.pid, r.split, r.captions, r.captions_bt) for r in ann.entries]


def check_outcome(read, files, good, bad_entry, defect):
    "Run `read()`: defects must raise a TBPSError naming the file (and the entry), clean input must round-trip."
    event(f"defect: {defect}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # readers warn about non-ASCII captions: legal, kept
            ann = read()
    except TBPSError as e:
        msg = str(e)
        assert defect != "none", f"clean input refused: {msg}"
        assert any(str(f) in msg or str(Path(f).parent) in msg for f in files), msg
        if bad_entry is not None:
            assert f"entry {bad_entry}" in msg, msg
        elif defect == "duplicate_image":
            assert "more than one entry" in msg or "duplicate_image" in msg, msg
        elif defect == "shared_id":
            assert "more than one split" in msg or "shared_id" in msg, msg
        return
    assert defect == "none", f"defect {defect} (entry {bad_entry}) was accepted"
    assert got(ann) == expected(good)


# --- the normalised format (and the readers built on it) ---------------------------------------------------------

def normalised_doc(raw):
    return dict(format=FORMAT, version=FORMAT_VERSION, dataset="fuzz", image_root="images", meta={}, records=raw)


@FUZZ
@given(data=dataset("normalised"), reader=st.sampled_from(["read_annotations", "annotations", "synthpedes"]))
def test_normalised_reader(data, reader):
    TRIED["test_normalised_reader"] += 1
    raw, good, bad, defect = data
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "annotations.json"
        f.write_text(json.dumps(normalised_doc(raw)))
        read = {"read_annotations": lambda: read_annotations(f),
                "annotations": lambda: load_annotations("annotations", annotations=str(f)),
                "synthpedes": lambda: dataset_reader("synthpedes")(d)}[reader]
        check_outcome(read, [f], good, bad, defect)


@FUZZ
@given(data=dataset("normalised"), cut=st.floats(0, 1, exclude_max=True), ascii_only=st.booleans())
def test_truncated_normalised_file(data, cut, ascii_only):
    "Any strict prefix of a file is refused as invalid JSON (or not UTF-8), naming the file."
    TRIED["test_truncated_normalised_file"] += 1
    text = json.dumps(normalised_doc(data[0]), ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "ann.json"
        f.write_bytes(text[: int(cut * len(text))])
        with pytest.raises(TBPSError, match=r"ann\.json: (not valid JSON|not UTF-8|not a tbps-clip)"):
            read_annotations(f)


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
                    lambda xs: st.lists(xs, max_size=4) | st.dictionaries(st.text(max_size=8), xs, max_size=4), max_leaves=20)


@FUZZ
@given(doc=st.one_of(JSON, st.fixed_dictionaries(
    dict(format=st.sampled_from([FORMAT, FORMAT, FORMAT, "other"]), version=st.sampled_from([1, 1, 1, 2, "1"]),
         records=st.one_of(st.just([]), JSON, st.lists(JSON, max_size=4))),
    optional=dict(image_root=JSON, dataset=JSON, meta=JSON))))
def test_normalised_reader_on_any_json(doc):
    "Arbitrary JSON documents (wrong top-level types, wrong field types) give a TBPSError or a valid record set."
    TRIED["test_normalised_reader_on_any_json"] += 1
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "ann.json"
        f.write_text(json.dumps(doc))
        try: ann = read_annotations(f)
        except TBPSError as e:
            assert str(f) in str(e)
            return
        assert len(ann.entries) == len(doc["records"]) and ann.image_root.is_absolute()


def test_duplicate_keys_and_deep_nesting_are_refused(tmp_path):
    "Two inputs json.loads would accept or crash on: a repeated key (silently last-wins) and 100,000 nested lists."
    f = tmp_path / "a.json"
    f.write_text('{"format": "%s", "version": 1, "records": [{"image": "a.jpg", "pid": 1, "pid": 2, '
                 '"captions": ["x"], "split": "train"}]}' % FORMAT)
    with pytest.raises(TBPSError, match=r"a.json: not valid JSON: the key 'pid' appears twice"):
        read_annotations(f)
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TBPSError, match="nested too deeply"):
        read_annotations(f)


# --- the raw dataset formats -------------------------------------------------------------------------------------

def write_raw(folder: Path, kind: str, raw: list, splits: list) -> list:
    "Write `raw` as `kind`'s annotation file(s) in `folder` (with an empty image folder); the files written."
    (folder / IMAGE_DIR).mkdir(parents=True)
    fmt = raw_formats()[kind]
    if not fmt.per_split:
        f = folder / fmt.files[0]
        f.write_text(json.dumps(raw))
        return [f]
    by = {}
    for e, s in zip(raw, splits): by.setdefault(s, []).append(e)
    files = []
    for s, es in by.items():
        files.append(folder / fmt.split_files[s]); files[-1].write_text(json.dumps(es))
    return files



@FUZZ
@given(kind=st.sampled_from(["cuhk-pedes", "icfg-pedes", "rstpreid", "official"]), data=st.data())
def test_raw_readers(kind, data):
    TRIED[f"test_raw_readers[{kind}]"] += 1
    TRIED["test_raw_readers"] += 1
    raw, good, bad, defect = data.draw(dataset(kind))
    if kind == "official":
        # the file an entry lands in is its split; entry numbers count within each file
        if bad is not None:
            s = good[bad]["split"]
            bad = sum(1 for r in good[:bad] if r["split"] == s)
    with tempfile.TemporaryDirectory() as d:
        files = write_raw(Path(d), kind, raw, [r["split"] for r in good])
        check_outcome(lambda: read_dataset(kind, d), files, good, bad, defect)


@FUZZ
@given(kind=st.sampled_from(["cuhk-pedes", "icfg-pedes", "rstpreid", "official"]), doc=JSON)
def test_raw_readers_on_any_json(kind, doc):
    TRIED["test_raw_readers_on_any_json"] += 1
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / IMAGE_DIR).mkdir()
        f = folder / raw_formats()[kind].files[0]  # the authors' train file for official
        f.write_text(json.dumps(doc))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ann = read_dataset(kind, d)
        except TBPSError as e:
            assert str(f) in str(e) or str(folder) in str(e)
            return
        assert isinstance(doc, list) and len(ann.entries) == len(doc)


@pytest.mark.parametrize("kind", ["cuhk-pedes", "icfg-pedes", "rstpreid", "official"])
@pytest.mark.parametrize("field, value, message", [
    ("id", 2**64, "'id' must be an integer"), ("path", "lone\ud800.jpg", "cannot be a file name"),
    ("captions", ["..."], "has no words once cleaned"), ("path", "../../etc/passwd", "leaves the image root"),
])
def test_raw_reader_regressions(tmp_path, kind, field, value, message):
    "Defects the fuzzers found (through the code the readers share), pinned for every raw format."
    fmt = raw_formats()[kind]
    pf = fmt.path_field
    e = {"id": 1, "captions": ["a man in a red coat"], pf: "a.jpg", **({} if fmt.per_split else {"split": "train"})}
    e[pf if field == "path" else field] = value
    write_raw(tmp_path, kind, [e], ["train"])
    with pytest.raises(TBPSError, match=rf"entry 0 .*{re.escape(message)}"):
        read_dataset(kind, tmp_path)


# --- the caption pipeline ----------------------------------------------------------------------------------------

@FUZZ
@given(caption=st.one_of(CAPTION, st.text(max_size=300), st.sampled_from(AWKWARD + ["", "   ", "!!!", "\x00"])),
       max_words=st.integers(1, 100))
def test_clean_caption(caption, max_words):
    TRIED["test_clean_caption"] += 1
    out = clean_caption(caption, max_words)
    words = out.split()
    assert isinstance(out, str) and len(words) <= max_words
    assert out == " ".join(words)  # single spaces, no leading or trailing whitespace
    assert not _PUNCT.search(out)
    assert clean_caption(out, max_words) == out  # cleaning twice changes nothing
    if len(caption.split()) >= max_words + 5:
        event("truncated")


@FUZZ
@given(texts=st.lists(st.one_of(CAPTION, st.text(max_size=300), st.sampled_from(AWKWARD + ["", "\x00", "\ud800\udfff"])),
                      max_size=5),
       context_length=st.integers(4, 77))
def test_tokenize(texts, context_length):
    TRIED["test_tokenize"] += 1
    tok = tokenize([clean_caption(t) for t in texts], context_length)
    assert tok.shape == (len(texts), context_length) and tok.dtype == torch.long
    n_vocab = vocab_size()
    for row in tok.tolist():
        assert row[0] == SOT_TOKEN and row.count(EOT_TOKEN) == 1
        end = row.index(EOT_TOKEN)
        assert all(0 < t < n_vocab for t in row[:end + 1]) and all(t == 0 for t in row[end + 1:])
