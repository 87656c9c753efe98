"""The HTML reports in a real browser: headless Chromium (Debian's) driven by playwright."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmgradcam.data.shapes import COLORS, SHAPES, make_image, write_split
from tiny import tiny_captioner, tiny_vqa

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("MMGRADCAM_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
INJECTION = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is needed for the report tests: apt-get install -y chromium (see .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    yield page
    page.close()


def cli(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "mmgradcam.cli", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def caption_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_report")
    tiny_captioner(root / "model")
    Image.fromarray(make_image(2, seed=4)[0]).save(root / "img.png")
    cli("caption", "img.png", "--caption", "a red circle and two blue stars", "--model", str(root / "model"),
        "--method", "gradcam,hirescam", "--html", "--out", "out", cwd=root)
    return root / "out" / "report.html"


def test_clicking_a_word_shows_its_map(page, caption_report):
    page.goto(caption_report.as_uri())
    maps = page.evaluate("DATA.views.caption.maps")
    assert set(maps) == {"gradcam", "hirescam"} and len(maps["gradcam"]) == 7
    overlay = page.locator("img.overlay")
    assert overlay.get_attribute("src") == maps["gradcam"][0]
    page.locator("button.word", has_text="circle").click()
    assert overlay.get_attribute("data-index") == "2"
    assert overlay.get_attribute("src") == maps["gradcam"][2] != maps["gradcam"][0]
    assert page.locator("button.word.active").inner_text() == "circle"
    assert "circle" in page.locator(".shown").inner_text()
    page.select_option("select.method", "hirescam")
    assert overlay.get_attribute("src") == maps["hirescam"][2]
    page.locator("input.opacity").fill("80")
    assert page.evaluate("document.querySelector('img.overlay').style.opacity") == "0.8"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "caption_report.png"), full_page=True)
    assert (ARTIFACTS / "caption_report.png").stat().st_size > 5000
    assert all(url.startswith(("file:", "data:")) for url in page.requests)  # nothing from the network


def test_injected_question_renders_as_text_and_runs_nothing(page, tmp_path):
    words = ["what", "color", "is", "the", "?"] + list(COLORS) + list(SHAPES)
    tiny_vqa(tmp_path / "vqa", words, sorted(COLORS) + ["yes", "no"], max_question=24)
    Image.fromarray(make_image(1, seed=4)[0]).save(tmp_path / "img.png")
    question = f"what color is the circle {INJECTION} ?"
    cli("vqa", "img.png", question, "--model", str(tmp_path / "vqa"), "--top-k", "2", "--html", "--out", "out",
        cwd=tmp_path)
    page.goto((tmp_path / "out" / "report.html").as_uri())
    page.wait_for_timeout(300)
    assert page.dialogs == []
    assert INJECTION in page.locator("p.question").inner_text()
    assert page.locator("img[src='x']").count() == 0
    buttons = page.locator("button.answer")
    assert buttons.count() == 2
    buttons.nth(1).click()
    assert page.locator("img.overlay").get_attribute("data-index") == "1"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "vqa_report.png"), full_page=True)


def test_eval_report_sorts_and_links(page, tmp_path):
    tiny_captioner(tmp_path / "model")
    paths = write_split(tmp_path / "data", "test", 4, seed=2)
    cli("eval", "--instances", str(paths["instances"]), "--captions", str(paths["captions"]), "--images",
        str(paths["images"]), "--model", str(tmp_path / "model"), "--references", "--quiet", "--html", "--out", "ev",
        cwd=tmp_path)
    assert (tmp_path / "ev" / "plots" / "categories_reference.png").is_file()
    page.goto((tmp_path / "ev" / "report.html").as_uri())
    header = page.locator("#words th", has_text="energy").first
    header.click()
    values = [float(v) for v in page.eval_on_selector_all("#words tbody tr td:nth-child(6)",
                                                          "cells => cells.map(c => c.dataset.value)")]
    assert values == sorted(values) and len(values) > 3
    header.click()
    values = [float(v) for v in page.eval_on_selector_all("#words tbody tr td:nth-child(6)",
                                                          "cells => cells.map(c => c.dataset.value)")]
    assert values == sorted(values, reverse=True)
    link = page.locator("#words tbody a").first
    target = link.get_attribute("href")
    link.click()
    assert page.evaluate("location.hash") == target
    section = page.locator(f"section{target}")
    assert section.locator("img.overlay").get_attribute("src").startswith("data:image/png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "eval_report.png"), full_page=True)
