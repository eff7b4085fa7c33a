"""`legion app` in a real browser (Debian's chromium, Playwright) and through its `/analyze` API endpoint.

The app runs as `legion app` in a subprocess on a free local port. By default it serves the tiny random
model; LEGION_APP_MODEL / LEGION_APP_DETECTOR / LEGION_APP_EXAMPLES / LEGION_APP_MAX_NEW_TOKENS point it at
another one (the README's screenshot docs/app.png is this test's, run on the demo's trained model:
scripts/screenshot_app.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legion.infer import Analyzer, AnalyzerConfig, InferConfig, run_inference
from tests.browser import CHROMIUM_FLAGS, chromium_path

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_setup(tmp_path_factory, tiny_model_dir, toy_data_dir):
    """(url, model dir, detector dir, image folder): `legion app` on 127.0.0.1, stopped at the end. The
    images uploaded are ToyScars test images (or those of the first LEGION_APP_EXAMPLES folder)."""
    from legion.model.detector import build_detector

    root = tmp_path_factory.mktemp("app")
    model = os.environ.get("LEGION_APP_MODEL", str(tiny_model_dir))
    detector = os.environ.get("LEGION_APP_DETECTOR")
    if detector is None:
        detector = str(root / "detector")
        build_detector(tiny_model_dir, seed=0).save(detector)
    examples = os.environ.get("LEGION_APP_EXAMPLES", str(toy_data_dir / "test" / "images")).split(os.pathsep)
    images = Path(examples[0])
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "legion.cli",
        "app",
        "--model",
        model,
        "--detector",
        detector,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-new-tokens",
        os.environ.get("LEGION_APP_MAX_NEW_TOKENS", "48"),
        "--examples",
        *examples,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(root / "app.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"legion app exited: {(root / 'app.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"legion app did not answer within 180 s: {(root / 'app.log').read_text()[-3000:]}")
    yield url, model, detector, images
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_page_analyses_an_upload_and_survives_a_bad_one(app_setup, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _, _, images = app_setup
    not_an_image = tmp_path / "holiday.png"
    not_an_image.write_text("this is a text file, not a picture\n")
    errors: list[str] = []
    rendered = (
        "() => { const i = document.querySelector('#overlay img'); return i && i.complete && i.naturalWidth > 0 }"
    )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector("#analyse", timeout=60_000)

        def analyse(path):
            page.locator("#upload input[type=file]").set_input_files(str(path))
            page.wait_for_timeout(1500)
            page.locator("#analyse").click()

        analyse(sorted(images.iterdir())[0])
        page.wait_for_function(rendered, timeout=120_000)
        verdict = page.locator("#legion-verdict").inner_text()
        assert verdict.split()[0] in ("fake", "real") and "P(fake)" in verdict
        assert page.locator("#legion-explanation").inner_text().strip()
        page.wait_for_timeout(1500)  # Gradio fades finished outputs back in: let that end before the picture
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("LEGION_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["LEGION_SCREENSHOT_DIR"]) / "app.png")

        analyse(not_an_image)  # a text file renamed .png: a readable message, and the app keeps serving
        page.get_by_text("Cannot analyse holiday.png").first.wait_for(timeout=60_000)
        assert "the file is not an image" in page.locator("body").inner_text()

        page.reload()
        page.wait_for_selector("#analyse", timeout=60_000)
        analyse(sorted(images.iterdir())[-1])
        page.wait_for_function(rendered, timeout=120_000)
        assert page.locator("#legion-verdict").inner_text().split()[0] in ("fake", "real")
        browser.close()
    assert errors == [], errors


def test_analyze_endpoint_returns_the_infer_record(app_setup, tmp_path):
    from gradio_client import Client, handle_file

    url, model, detector, images = app_setup
    image = sorted(images.iterdir())[0]
    record = Client(url, verbose=False).predict(handle_file(str(image)), api_name="/analyze")

    (tmp_path / "imgs").mkdir()
    shutil.copy(image, tmp_path / "imgs" / image.name)
    tokens = int(os.environ.get("LEGION_APP_MAX_NEW_TOKENS", "48"))
    settings = dict(model_path=model, detector_path=detector, device="cpu", dtype="float32", max_new_tokens=tokens)
    analyzer = Analyzer.from_config(AnalyzerConfig(**settings, sam_input_size=None))
    cfg = InferConfig(image_dir=str(tmp_path / "imgs"), output_dir=str(tmp_path / "out"), progress=False)
    run_inference(cfg, analyzer)
    written = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert record["image"] == written["image"] == image.name and isinstance(record["fake_prob"], float)
    assert {k: v for k, v in record.items() if k != "seconds"} == {k: v for k, v in written.items() if k != "seconds"}


# --- the page's logic, without a browser --------------------------------------------------------------
@pytest.fixture(scope="module")
def app_logic(tiny_model_dir):
    import legion
    from legion.app import LegionApp

    model = legion.load(tiny_model_dir, device="cpu", dtype="float32", max_new_tokens=8, sam_input_size=None)
    return LegionApp(model)


def _analysis_with_two_masks(phrases):
    from legion.api import Analysis
    from legion.record import PredictionRecord
    from legion.utils.rle import mask_to_rle

    image = np.full((20, 30, 3), 100, np.uint8)
    left, right = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    left[:, :10], right[:, 20:] = 1, 1
    record = PredictionRecord(
        image="x.png",
        width=30,
        height=20,
        verdict="fake",
        explanation=f"The {phrases[0]} and the {phrases[1]} look wrong.",
        phrases=list(phrases),
        masks=[mask_to_rle(left), mask_to_rle(right)],
    )
    return Analysis(record, image)


def test_each_phrase_mask_can_be_switched_off():
    from legion.app import LegionApp, phrase_labels

    analysis = _analysis_with_two_masks(["odd hand", "odd hand"])
    labels = phrase_labels(analysis)
    assert labels == ["1. odd hand", "2. odd hand"]  # numbered: equal phrases stay separate switches
    both = np.asarray(LegionApp.overlay(analysis))
    only_first = np.asarray(LegionApp.overlay(analysis, [labels[0]]))
    none = np.asarray(LegionApp.overlay(analysis, []))
    assert (none == analysis.image).all()
    assert (only_first[:, :10] == both[:, :10]).all() and (only_first[:, :10] != analysis.image[:, :10]).any()
    assert (only_first[:, 20:] == analysis.image[:, 20:]).all() and (both[:, 20:] != analysis.image[:, 20:]).any()
    assert (both[:, 10:20] == analysis.image[:, 10:20]).all()  # unmasked pixels untouched


def test_phrases_and_verdict_are_escaped_and_coloured():
    from legion.app import LegionApp
    from legion.gallery import colour

    analysis = _analysis_with_two_masks(["<script>x</script> hand", "sky"])
    verdict = LegionApp.verdict_html(analysis)
    explanation = LegionApp.explanation_html(analysis)
    assert "<script>" not in verdict and "<script>" not in explanation
    assert "&lt;script&gt;" in verdict
    assert f"rgb{colour(1)}" in verdict  # the second phrase's chip has its mask's colour
    record = json.loads(Path(LegionApp.record_file(analysis)).read_text())
    assert record == analysis.to_json()


def test_options_are_per_request_and_checked(app_logic, toy_data_dir):
    from legion.errors import OptionError

    image = sorted((toy_data_dir / "test" / "images").iterdir())[0]
    defaults = dict(app_logic.defaults)
    short = app_logic.analyze_path(str(image), max_new_tokens=2, sam_input_size=64)
    assert short.record.sam_input_size == 64 and short.record.image == image.name
    after = app_logic.analyze_path(str(image))  # e.g. the API endpoint: the app's own settings again
    assert after.record.sam_input_size == defaults["sam_input_size"]
    assert app_logic.analyzer.max_new_tokens == defaults["max_new_tokens"]
    for bad, message in (
        (dict(max_new_tokens=0), "max new tokens"),
        (dict(sam_input_size=10_000), "SAM input size must be between 1 and"),
        (dict(gate_threshold=1.5), "gate threshold"),
    ):
        with pytest.raises(OptionError, match=message):
            app_logic.analyze_path(str(image), **bad)
    with pytest.raises(OptionError, match="no image"):
        app_logic.analyze_path(None)


def test_bad_uploads_get_messages_without_server_paths(app_logic, tmp_path):
    from legion.app import upload_problem
    from legion.data.images import ImageReadError

    text = tmp_path / "secret_dir" / "holiday.png"
    text.parent.mkdir()
    text.write_text("not a picture")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, words in ((text, "not an image this app can read"), (empty, "Cannot analyse empty.jpg")):
        with pytest.raises(ImageReadError) as caught:
            app_logic.analyze_path(str(path))
        message = upload_problem(caught.value)
        assert words in message and str(tmp_path) not in message


def test_example_images_from_files_and_folders(tmp_path):
    from legion.app import MAX_EXAMPLES, example_images

    for i in range(6):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("x")
    found = example_images([tmp_path, tmp_path / "5.png", tmp_path / "missing.png"])
    assert found == [str(tmp_path / f"{i}.png") for i in range(4)] + [str(tmp_path / "5.png")]
    assert len(example_images([tmp_path] * 5)) == MAX_EXAMPLES
