"""Shared fixtures: an isolated cache, offline hubs, the toy dataset of `tbps_clip.fixtures`, and a headless browser."""
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for a hub: there is no internet in CI
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from tbps_clip.fixtures import make_toy_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    "Every test gets the session's private cache folder, never the user's."
    monkeypatch.setenv("TBPS_CLIP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def toy(tmp_path):
    "Path of a freshly written toy annotation file."
    return make_toy_dataset(tmp_path / "toy")


def micro_overrides(ann_path, out_dir, **extra):
    "Overrides for a seconds-long run of the micro architecture on a toy dataset."
    d = {"model.arch": "tbps-micro", "model.pretrained": "none", "data.dataset": "annotations",
         "data.annotations": str(ann_path), "data.image_size": "[32,16]", "data.batch_size": 8,
         "train.epochs": 2, "train.log_every": 1, "out_dir": str(out_dir), "optim.lr": 1e-3}
    d.update(extra)
    return d


def _chromium():
    "(browser, driver) paths, or None when Debian's chromium is not installed."
    b = shutil.which("chromium") or shutil.which("chromium-browser")
    d = shutil.which("chromedriver")
    return (b, d) if b and d else None


def headless_chromium():
    "A selenium driver of headless Debian chromium (the caller quits it); skips the test when either is missing."
    found = _chromium()
    if not found:
        pytest.skip("chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(found[1]), options=opts)


@pytest.fixture
def browser():
    """The page's browser for one test: `drv` (headless chromium, quit after the test), `wait` (60 s), selenium's `By`,
    `Keys` and `EC`, and `hits()`, `text(id)`, `shows(id, text)`, `images_loaded()`."""
    from types import SimpleNamespace
    drv = headless_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(drv, 60)
    b = SimpleNamespace(drv=drv, wait=wait, By=By, Keys=Keys, EC=EC)
    b.hits = lambda: drv.find_elements(By.CSS_SELECTOR, "figure.hit")
    b.text = lambda id_: drv.find_element(By.ID, id_).text
    b.shows = lambda id_, text: wait.until(EC.text_to_be_present_in_element((By.ID, id_), text))
    b.images_loaded = lambda: wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('figure.hit img')].every(i => i.complete && i.naturalWidth > 0)"))
    try:
        yield b
    finally:
        drv.quit()
