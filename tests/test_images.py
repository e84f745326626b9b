"""Bad and unusual image files: clear errors naming the path, correct pixels for odd but valid modes, training that
stops with the path or (opt-in) skips and counts, and image paths that never leave the image root."""
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import micro_overrides
from tbps_clip.config import make_config
from tbps_clip.core import TBPSError
from tbps_clip.data import MAX_IMAGE_PIXELS, load_image
from tbps_clip.datasets import read_dataset
from tbps_clip.fixtures import write_fixture
from tbps_clip.annotations import read_annotations
from tbps_clip.run import train

REPO = Path(__file__).resolve().parents[1]
TRIED = Counter()


def png_header_only(width: int, height: int) -> bytes:
    "A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's calling card)."
    def chunk(kind, data): return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def encoded(fmt: str, mode: str = "RGB", size=(24, 40), **kw) -> bytes:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt, **kw)
    return buf.getvalue()


# --- files that cannot be read ------------------------------------------------------------------------------------

BAD = {
    "truncated JPEG": lambda: encoded("JPEG")[: len(encoded("JPEG")) // 2],
    "truncated PNG": lambda: encoded("PNG")[: int(len(encoded("PNG")) * 0.6)],
    "JPEG header only": lambda: encoded("JPEG")[:200],
    "zero bytes": lambda: b"",
    "text named .jpg": lambda: b"this is not an image\n" * 10,
    "garbage after a PNG signature": lambda: b"\x89PNG\r\n\x1a\n" + os.urandom(200),
    f"header claims 100000x100000 (PIL's own bomb limit)": lambda: png_header_only(100_000, 100_000),
    f"header claims 9000x8000 (over MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS:,})": lambda: png_header_only(9000, 8000),
}


@pytest.mark.parametrize("name", list(BAD))
def test_unreadable_files_name_the_path(tmp_path, name):
    p = tmp_path / "sub dir" / "img.jpg"
    p.parent.mkdir()
    p.write_bytes(BAD[name]())
    with pytest.raises(TBPSError) as e:
        load_image(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and ("cannot read image" in msg or "pixel limit" in msg), msg


def test_bomb_limit_is_the_librarys_own(tmp_path, monkeypatch):
    "The limit holds even if something in the process switched Pillow's own check off."
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    (tmp_path / "b.png").write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(TBPSError, match=r"100000x100000, larger than the 64,000,000-pixel limit"):
        load_image(tmp_path / "b.png")


def test_directories_fifos_and_missing_files(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    os.mkfifo(tmp_path / "f.jpg")  # opening a FIFO for reading would block for ever
    for name, msg in [("d.jpg", "not a regular file"), ("f.jpg", "not a regular file"), ("none.jpg", "image file not found")]:
        with pytest.raises(TBPSError, match=f"{name}: {msg}"):
            load_image(tmp_path / name)


@settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]), data=st.data())
def test_damaged_files_give_an_image_or_a_clear_error(fmt, data):
    "Random truncation, byte flips and insertions: an RGB image of the right size, or a TBPSError with the path."
    TRIED["test_damaged_files_give_an_image_or_a_clear_error"] += 1
    raw = bytearray(encoded(fmt))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] ^= data.draw(st.integers(1, 255))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"x.{fmt.lower()}"
        p.write_bytes(bytes(raw))
        try:
            im = load_image(p)
        except TBPSError as e:
            assert str(e).startswith(f"{p}: "), e
            event(f"{fmt} {how}: refused")
            TRIED["refused"] += 1
            return
        assert im.mode == "RGB" and im.width * im.height <= MAX_IMAGE_PIXELS
        event(f"{fmt} {how}: decoded")


def test_zzz_report_counts(request):
    "Print the number of generated damaged files (runs last in this module)."
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and TRIED:
        tr.write_line(f"\nfuzz inputs tried: {dict(TRIED)}")


# --- unusual but valid images --------------------------------------------------------------------------------------

def test_grayscale_cmyk_palette_and_alpha_convert_to_rgb(tmp_path):
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (40, 1))
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    assert (np.asarray(load_image(tmp_path / "l.png"))[..., 1] == grey).all()
    Image.new("CMYK", (16, 32), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((8, 16))
    assert r > 200 and g < 40 and b < 40
    Image.new("RGBA", (16, 32), (10, 200, 30, 0)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (10, 200, 30)
    Image.new("P", (16, 32), 3).save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").size == (16, 32)
    Image.new("1", (16, 32), 1).save(tmp_path / "b.png")
    assert load_image(tmp_path / "b.png").getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    a = (np.arange(40 * 16).reshape(40, 16) * 100).astype(np.uint16)  # 0 .. 63,900
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = np.asarray(load_image(tmp_path / "g16.png"))[..., 0]
    assert (got == (a >> 8)).all()  # before the fix, Pillow's convert('RGB') made 99% of these pixels 255


def test_floating_point_images_are_refused(tmp_path):
    Image.fromarray(np.random.rand(32, 16).astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(TBPSError, match=r"f.tif: floating-point image"):
        load_image(tmp_path / "f.tif")


# --- training: stop with the path, or skip and count (opt-in) -------------------------------------------------------

def spoil(toy, which):
    "Damage the images of the entries numbered `which` (train split first); their paths."
    entries = read_annotations(toy).entries
    paths = []
    for i, kind in which:
        p = toy.parent / entries[i].image
        p.write_bytes(b"" if kind == "empty" else p.read_bytes()[:50])
        paths.append(entries[i].image)
    return paths


def test_training_stops_with_the_path_by_default(toy, tmp_path):
    bad = spoil(toy, [(4, "truncated")])
    args = [sys.executable, "-m", "tbps_clip.cli", "train"] + [f"{k}={v}" for k, v in micro_overrides(
        toy, tmp_path / "r", **{"train.threads": 1, "train.epochs": 1}).items()]
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [l[l.index("tbps-clip: error:"):] for l in p.stderr.splitlines() if "tbps-clip: error:" in l]  # after tqdm's bar
    assert len(err) == 1 and f"{bad[0]}: cannot read image" in err[0] and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_skip_bad_images_skips_counts_and_reports(toy, tmp_path):
    bad = spoil(toy, [(0, "truncated"), (7, "empty")])
    out = tmp_path / "r"
    cfg = make_config("clip", micro_overrides(toy, out, **{"data.skip_bad_images": True, "train.threads": 1, "train.epochs": 1}))
    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        rec = train(cfg, progress=False)
    assert rec["skipped_images"] == dict(count=2, examples=bad)
    assert rec["train_pairs"] == 48 - 2 * 2  # two captions per image
    log = (out / "log.txt").read_text()
    assert "skipped 2 unreadable training image(s)" in log and all(b in log for b in bad)
    assert json.loads((out / "results.json").read_text())["skipped_images"]["count"] == 2


def test_evaluation_never_skips(toy, tmp_path):
    entries = read_annotations(toy).entries
    test_img = next(r.image for r in entries if r.split == "test")
    (toy.parent / test_img).write_bytes(b"")
    cfg = make_config("clip", micro_overrides(toy, tmp_path / "r", **{"data.skip_bad_images": True, "train.max_steps": 1,
                                                                       "train.threads": 1}))
    with pytest.raises(TBPSError, match=f"{test_img}: cannot read image"):
        train(cfg, progress=False)


# --- paths that try to leave the image root -------------------------------------------------------------------------

@pytest.mark.parametrize("image, message", [
    ("../outside.png", "leaves the image root"), ("images/../../outside.png", "leaves the image root"),
    ("/etc/passwd", "absolute path"), ("..\\outside.png", "leaves the image root"), ("C:/x.png", "absolute path"),
])
def test_annotation_paths_leaving_the_root_are_refused_when_read(toy, image, message):
    d = json.loads(toy.read_text())
    d["records"][2]["image"] = image
    toy.write_text(json.dumps(d))
    with pytest.raises(TBPSError, match=rf"entry 2 .*{message}"):
        read_annotations(toy)


def test_symlinks_out_of_the_root_are_refused(toy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (16, 32)).save(outside / "x.png")
    entries = read_annotations(toy).entries
    victim = toy.parent / entries[1].image
    victim.unlink()
    victim.symlink_to(outside / "x.png")  # a readable image, but outside the root
    ann = read_annotations(toy)
    with pytest.raises(TBPSError, match="outside the image root"):
        ann.image_path(ann.entries[1])
    with pytest.raises(TBPSError, match="outside the image root"):
        train(make_config("clip", micro_overrides(toy, tmp_path / "r", **{"train.threads": 1})), progress=False)


def test_raw_reader_refuses_symlinked_folders_out_of_the_root(tmp_path):
    info = write_fixture("cuhk-pedes", tmp_path / "cuhk")
    os.symlink("/etc", tmp_path / "cuhk" / "imgs" / "out")
    raw = json.loads(info["files"][0].read_text())
    raw[0]["file_path"] = "out/passwd"
    info["files"][0].write_text(json.dumps(raw))
    with pytest.raises(TBPSError, match=r"path_escape .*entry 0 \(out/passwd\).*outside the image root"):
        read_dataset("cuhk-pedes", tmp_path / "cuhk")
