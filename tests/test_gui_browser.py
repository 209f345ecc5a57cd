"""The GUI in a real browser: Playwright drives Debian's Chromium (headless, no browser download).

Opens the app, picks ADA_SURGE and cascade, trains the tiny model for two steps and waits for the progress
bar to reach the end, runs a tiny merge, opens Inspect on the training output. Screenshots go to
$SURGE_ARTIFACTS_DIR (default: test-artifacts/ in the repository). Skipped, with the reason, only where
Chromium or Playwright cannot be found (CI installs both: .ci/run).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("SURGE_ARTIFACTS_DIR", REPO / "test-artifacts"))

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "sd_scripts_surge.gui", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode(errors="replace") if proc.stdout else "app died") from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("the GUI did not come up within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url: str):  # noqa: ANN201 - playwright Page
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: install Debian's chromium (apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1800})
        pg.goto(app_url)
        pg.wait_for_selector("text=sd-scripts-surge", timeout=60_000)
        yield pg
        browser.close()


def _pick(page, elem_id: str, option: str) -> None:  # noqa: ANN001
    """Choose a value in a gradio dropdown the way a user does: open it, click the option."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(option)
    page.locator(f"ul[role='listbox'] li[aria-label='{option}']").first.click()


def _fill(page, elem_id: str, value: str) -> None:  # noqa: ANN001
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(value)


def test_train_merge_inspect_in_chromium(page, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("gui_browser")
    out_dir = tmp / "train"
    page.get_by_role("tab", name="Train").click()
    _pick(page, "train-optimizer_type", "AdamW")
    _pick(page, "train-optimizer_type", "ADA_SURGE")
    _pick(page, "train-lr_scheduler", "constant")
    _pick(page, "train-lr_scheduler", "cascade")
    _fill(page, "train-max_train_steps", "2")
    _fill(page, "train-output_dir", str(out_dir))
    _fill(page, "train-config-path", str(tmp / "gui.toml"))
    page.locator("#train-start").click()
    page.wait_for_selector("#train-progress .surge-progress[data-progress='100']", timeout=600_000)
    page.screenshot(path=str(ARTIFACTS / "gui_train.png"), full_page=True)
    toml_text = (tmp / "gui.toml").read_text()
    assert 'optimizer_type = "ADA_SURGE"' in toml_text and 'lr_scheduler = "cascade"' in toml_text
    assert (out_dir / "surge.safetensors").exists()  # output_name "surge"
    assert "training finished" in page.locator("#train-progress").inner_text()

    a, b = tmp / "a.safetensors", tmp / "b.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(a))
    save_file({"w": torch.ones(4, 4)}, str(b))
    merged = tmp / "merged.safetensors"
    page.get_by_role("tab", name="Merge").click()
    _pick(page, "merge-method", "soup")
    _fill(page, "merge-models", f"{a}\n{b}")
    _fill(page, "merge-output", str(merged))
    page.locator("#merge-start").click()
    page.wait_for_selector("#merge-progress .surge-progress[data-progress='100']", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "gui_merge.png"), full_page=True)
    assert torch.equal(load_file(str(merged))["w"].float(), torch.full((4, 4), 0.5))
    assert 'method = "soup"' in page.locator("#merge-recipe").inner_text()

    page.get_by_role("tab", name="Inspect").click()
    _fill(page, "inspect-folder", str(out_dir))
    page.locator("#inspect-show").click()
    page.wait_for_selector("#inspect-gallery img", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "gui_inspect.png"), full_page=True)
    assert page.locator("#inspect-gallery img").count() >= 2  # the LR heatmap, anchors, losses, samples
