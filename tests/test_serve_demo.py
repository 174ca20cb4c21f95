"""The demo page (`GET /`) in headless Chromium driven by Playwright: it loads, lists the model and its adapters, a
prompt streams an answer into both panes, and switching a pane to another adapter changes its answer.

The browser is Debian's `chromium` (scripts/setup.sh installs it); the test skips, saying why, only where neither it
nor Playwright can be had."""

from __future__ import annotations

import shutil

import pytest
from test_serve import LiveServer

from realm.lora.packaged import packaged_adapters
from realm.runtime.engine import EngineConfig
from realm.serve import Server, ServerConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed machine without a network: no background connections, no sandbox (root), no GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (scripts/setup.sh "
                                   "installs it)")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: scripts/setup.sh installs Debian's chromium package (apt-get, as root)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def smollm2_with_adapters(smollm2):
    """The shared SmolLM2 with the packaged demo adapters, removed again afterwards (other tests expect none)."""
    added = [name for name, path in packaged_adapters().items() if name not in smollm2.loras]
    for name in added:
        smollm2.add_lora(name, packaged_adapters()[name])
    yield smollm2
    for name in added:
        smollm2.remove_lora(name)


def test_the_page_streams_answers_and_the_adapter_switch_changes_them(browser, smollm2_with_adapters):
    smollm2 = smollm2_with_adapters
    server = Server(ServerConfig(model="smollm2", engine=EngineConfig(kv_blocks=128)), model=smollm2)
    with LiveServer(create_app(server)) as live:
        page = browser.new_page()
        page.goto(live.url + "/")
        selects = page.locator("select.model")
        selects.first.locator("option").first.wait_for(state="attached")
        options = selects.first.locator("option").all_inner_texts()
        assert options[0] == "smollm2" and {"pirate", "robot"} <= set(options)
        page.fill("#prompt", "Tell me about the sea.")
        page.fill("#max-tokens", "24")
        selects.nth(0).select_option("smollm2")
        selects.nth(1).select_option("pirate")
        page.click("#send")
        page.wait_for_selector("#pane-a[data-done='1']", timeout=120_000)
        page.wait_for_selector("#pane-b[data-done='1']", timeout=120_000)
        base, pirate = (page.inner_text(f"#pane-{p} .out") for p in "ab")
        assert base.strip() and pirate.strip() and base != pirate
        assert base == smollm2.chat("Tell me about the sea.", max_tokens=24).text
        assert "tok/s" in page.inner_text("#pane-a .stats")
        selects.nth(1).select_option("robot")  # the switch: the same prompt, another adapter
        page.click("#send")
        page.wait_for_selector("#pane-b[data-done='1']", timeout=120_000)
        robot = page.inner_text("#pane-b .out")
        assert robot.strip() and robot != pirate
        page.close()
