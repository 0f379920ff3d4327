"""The serve page in a real browser: upload, overlay drawn in the class colours, class toggles.

Runs headless Debian Chromium (``/usr/bin/chromium``) through the ``playwright`` package; skips
when either is missing. ``DENSEPRED_SCREENSHOT=path.png`` saves a screenshot of the page, and
``DENSEPRED_SERVE_CHECKPOINT=ckpt.pt`` serves that checkpoint instead of a one-iteration model.
"""

import os
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")

from PIL import Image  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from densepred.data.synthetic import SyntheticShapes  # noqa: E402
from densepred.prediction import Predictor  # noqa: E402
from densepred.serve import create_app, running_server  # noqa: E402
from tiny import tiny_checkpoint  # noqa: E402

# Opaque overlay pixels grouped by colour, read back from the overlay canvas.
OVERLAY_COLOURS = """() => {
  const canvas = document.querySelector('#overlay');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const found = {};
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] === 0) continue;
    const key = `${data[i]},${data[i + 1]},${data[i + 2]},${data[i + 3]}`;
    found[key] = (found[key] || 0) + 1;
  }
  return found;
}"""


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    ckpt = os.environ.get("DENSEPRED_SERVE_CHECKPOINT")
    if not ckpt:
        ckpt = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return Predictor.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(SyntheticShapes("val", num_images=3, size=(192, 256)).load(2)[0]).save(path)
    return path


@pytest.fixture(scope="module")
def page(predictor):
    with running_server(create_app(predictor)) as url, sync_playwright() as pw:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            yield page
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


def _colours(page) -> dict[tuple[int, ...], int]:
    return {tuple(int(v) for v in key.split(",")): n for key, n in page.evaluate(OVERLAY_COLOURS).items()}


def test_upload_draws_the_overlay_and_toggles_change_it(page, predictor, scene):
    trained = predictor.trained
    page.wait_for_selector("#legend li")
    assert page.locator("#legend .name").all_inner_texts() == trained.class_names

    page.set_input_files("#file", str(scene))
    page.wait_for_function("() => document.body.dataset.segmented === '1'", timeout=30_000)
    assert page.locator("#status").inner_text() == "done"
    assert page.locator("#image-size").inner_text() == "256 × 192"
    assert float(page.locator("#inference-ms").inner_text().split()[0]) > 0

    page.click("#show-all")  # the background starts hidden; show every class to compare with the model
    colours = _colours(page)
    palette = {(*colour, 255): i for i, colour in enumerate(trained.palette)}
    assert colours, "the overlay canvas has no opaque pixel"
    assert set(colours) <= set(palette), f"overlay colours {set(colours)} are not class colours"
    expected, _ = predictor(np.asarray(Image.open(scene)))
    shown = {palette[c]: n for c, n in colours.items()}
    assert shown == {c: int(n) for c, n in enumerate(np.bincount(expected.ravel())) if n}

    # Hide the most frequent class: exactly its pixels become transparent, without a new request.
    top = max(shown, key=shown.get)
    renders = page.locator("#overlay").get_attribute("data-renders")
    page.locator(f'#legend li[data-class="{top}"] input').uncheck()
    page.wait_for_function(f"() => document.querySelector('#overlay').dataset.renders !== '{renders}'")
    after = _colours(page)
    assert (*trained.palette[top], 255) not in after
    assert sum(after.values()) == sum(colours.values()) - shown[top]
    assert page.evaluate("document.body.dataset.segmented") == "1"

    page.locator(f'#legend li[data-class="{top}"] input').check()
    assert _colours(page) == colours
    page.fill("#opacity", "35")  # CSS opacity only: the overlay's pixels stay the class colours
    assert page.locator("#overlay").evaluate("c => getComputedStyle(c).opacity") == "0.35"

    if shot := os.environ.get("DENSEPRED_SCREENSHOT"):
        page.set_input_files("#file", str(scene))  # again, so the timing shown is a warm one
        page.wait_for_function("() => document.body.dataset.segmented === '2'", timeout=30_000)
        page.click("#hide-all")
        for i, name in enumerate(trained.class_names):
            if name != "background":
                page.locator(f'#legend li[data-class="{i}"] input').check()
        page.fill("#opacity", "60")
        page.screenshot(path=shot)


def test_an_upload_error_is_shown(page, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    page.set_input_files("#file", str(text))
    page.wait_for_selector("#status.error")
    assert page.locator("#status").inner_text().startswith("415: notes.txt:")
