"""The playground in a real headless Chromium (Debian's package, driven by Playwright) against a real
``steerserve serve`` on the default model with ``STEERSERVE_API_KEY`` set: the page asks for the key, uploads
the example vector, streams a steered and an unsteered reply side by side and runs a 5-strength sweep; every
text it renders is checked against the API's own answer. It takes a screenshot into the test's temporary
folder, or to the path in ``STEERSERVE_SCREENSHOT`` (``make screenshot`` refreshes the README's
``docs/playground.png`` that way): a test run leaves the checkout as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what works here: no sandbox as root, no GPU, and none of Chromium's own network traffic
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "playground-key"
PROMPT = "Give me a tip for studying."
STRENGTHS = [-4.0, -2.0, 0.0, 2.0, 4.0]

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``steerserve serve`` on the default model (float32) with an API key; yields its URL."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium is not installed (make system-deps)")
        pytest.skip("Debian's chromium is not installed (make system-deps)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
    env.update(STEERSERVE_API_KEY=KEY, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "steerserve", "serve", "--port", str(port), "--quantization", "none"]
    cmd += ["--vector-dir", str(tmp_path_factory.mktemp("vectors")), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        try:
            return httpx.get(url + "/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=300, what="the server to load the default model")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def api(url: str, path: str, body: dict) -> dict:
    resp = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def text_of(page: Page, selector: str) -> str:
    return page.eval_on_selector(selector, "e => e.textContent")


def describe(layers: list[int]) -> str:
    """The page's short form of a layer list: ``9–19`` when contiguous, else ``9, 11, 13``."""
    contiguous = all(b == a + 1 for a, b in zip(layers, layers[1:], strict=False))
    return f"{layers[0]}–{layers[-1]}" if contiguous and len(layers) > 2 else ", ".join(map(str, layers))


def unlabelled_controls(page: Page) -> list[str]:
    """Form controls with no accessible name (no label, no aria-label)."""
    return page.eval_on_selector_all(
        "input, select, textarea",
        "els => els.filter(e => !e.labels?.length && !e.getAttribute('aria-label')).map(e => e.outerHTML)",
    )


def test_playground_in_headless_chromium(server, tmp_path):
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user data dir
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = browser.new_page()
            run_page(
                page, server, Path(os.environ.get("STEERSERVE_SCREENSHOT") or tmp_path / "playground.png")
            )
        finally:
            browser.close()


def run_page(page: Page, url: str, shot: Path) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/playground")
    # the key: asked once, kept in this tab only
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_function("() => document.getElementById('server-status').textContent.startsWith('Model:')")
    assert text_of(page, "#server-status") == "Model: SmolLM2-135M-Instruct"
    assert page.is_hidden("#key-form")
    assert page.evaluate("() => sessionStorage.getItem('steerserve-key')") == KEY
    assert page.evaluate("() => localStorage.length") == 0
    assert unlabelled_controls(page) == []

    # upload the example vector; the list shows kind, layers and relative norms
    page.click("summary:has-text('Upload a vector')")
    page.set_input_files("#upload-file", str(ROOT / "examples" / "polite.safetensors"))
    page.fill("#upload-name", "polite")
    page.click("#upload-form button")
    page.wait_for_function(
        "() => { const r = document.querySelector('tr[data-vector=polite]');"
        " return r && !['…', '?'].includes(r.cells[3].textContent); }"
    )
    cells = page.eval_on_selector_all("tr[data-vector=polite] td", "tds => tds.map(t => t.textContent)")
    norms = httpx.get(url + "/v1/vectors/polite/norms", headers={"Authorization": f"Bearer {KEY}"}).json()
    lo, hi = min(norms["relative"].values()), max(norms["relative"].values())
    assert cells == [
        "polite",
        "add",
        describe(norms["layers"]),
        f"{lo:.3f}" + (f"–{hi:.3f}" if hi > lo else ""),
    ]

    # steered and unsteered side by side, both streamed
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "32")
    page.select_option(".entry-vector", "polite")
    page.fill(".entry-strength", "4")
    page.click("#generate")
    page.wait_for_selector("#out-steered[data-done=true]", timeout=180_000)
    page.wait_for_selector("#out-plain[data-done=true]", timeout=180_000)
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_new_tokens": 32, "temperature": 0}
    steering = {"vectors": [{"name": "polite", "strength": 4, "positions": "all"}]}
    steered = api(url, "/generate", {**chat, "steering": steering})
    plain = api(url, "/generate", chat)
    assert text_of(page, "#out-steered") == steered["text"]
    assert text_of(page, "#out-plain") == plain["text"]
    assert steered["text"] != plain["text"]

    # a 5-strength sweep in a grid
    page.select_option("#sweep-vector", "polite")
    page.fill("#sweep-strengths", ", ".join(f"{w:g}" for w in STRENGTHS))
    page.click("#sweep-run")
    page.wait_for_function(
        "() => document.querySelectorAll('#sweep-grid .card').length === 5", timeout=300_000
    )
    shown = page.eval_on_selector_all(
        "#sweep-grid .card",
        "cs => cs.map(c => [c.dataset.strength, c.querySelector('.sweep-text').textContent])",
    )
    res = api(url, "/v1/sweep", {**chat, "vector": "polite", "strengths": STRENGTHS, "positions": "all"})
    assert shown == [[f"{r['strength']:g}", r["text"]] for r in res["results"]]
    assert res["results"][2]["text"] == plain["text"]  # strength 0 is the unsteered reply
    assert errors == []

    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
