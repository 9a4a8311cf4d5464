"""The web chat page in headless Chromium (Debian's `chromium`, driven by Playwright): type a message,
watch the reply stream in, keep the history for the next turn, reset. Skips when no browser is present."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (scripts/setup.sh installs it when CI=true)", allow_module_level=True)

from tinyserver import greedy_reference, serving, slow_steps  # noqa: E402

from lmforge.tokenizer.chat import prompt_ids, stop_token_ids  # noqa: E402

WATCH_REPLY = """() => {
  window.seen = [];  // the reply's text after every DOM change: several distinct values = streamed
  new MutationObserver(() => {
    const replies = document.querySelectorAll('.assistant');
    if (replies.length) window.seen.push(replies[replies.length - 1].textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_chat_page_streams_replies_keeps_history_and_resets(tmp_path):
    with serving(tmp_path / "ckpt") as (server, model, tok), sync_api.sync_playwright() as p:
        scheduler = server.server.config.app.state.scheduler
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "30")
            page.evaluate(WATCH_REPLY)
            with slow_steps(scheduler, 0.02):  # a step every 20 ms: tokens arrive as separate network reads
                page.fill("#input", "Hello there")
                page.press("#input", "Enter")
                page.wait_for_selector(".assistant[data-state=done]", timeout=30_000)
            history = [{"role": "user", "content": "Hello there"}]
            first = greedy_reference(model, tok, prompt_ids(tok, history), 30, stop_token_ids(tok))
            assert page.text_content(".assistant") == first and len(first) > 3
            partial = {t for t in page.evaluate("window.seen") if t and t != first}
            assert len(partial) >= 3, partial  # the reply grew piece by piece before it was complete

            page.fill("#input", "And then?")  # the second turn sends the whole conversation
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant:nth-of-type(4)[data-state=done]", timeout=30_000)
            history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
            second = greedy_reference(model, tok, prompt_ids(tok, history), 30, stop_token_ids(tok))
            assert page.locator(".assistant").nth(1).text_content() == second

            page.click("#reset")
            assert page.locator(".msg").count() == 0
            page.fill("#input", "Hello there")  # after a reset the history is empty again: same first answer
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant[data-state=done]", timeout=30_000)
            assert page.text_content(".assistant") == first
        finally:
            browser.close()
