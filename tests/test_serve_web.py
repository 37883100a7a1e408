"""The web chat page at `/`, in headless Debian Chromium driven by Playwright: a message gets a streamed
reply (the API's own reply), errors are shown, and "New conversation" starts over.

`make test` installs /usr/bin/chromium; without it this test fails rather than skips."""

import json

from helpers import _raw, live_server
from playwright.sync_api import expect, sync_playwright


def test_web_chat_streams_a_reply_and_shows_errors(served_run, long_prompts):
    with live_server(served_run) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page()
        page.goto(url + "/")
        expect(page.locator("#model")).to_have_text("tiny-chat")

        page.locator("#settings summary").click()
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        page.fill("#input", long_prompts["message"])
        page.press("#input", "Enter")
        reply = page.locator(".msg.assistant").first
        expect(reply).to_have_attribute("data-finish", "length", timeout=30_000)
        # the page showed the reply piece by piece, and it is the API's reply to the same message
        assert int(reply.get_attribute("data-chunks")) > 3
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": long_prompts["message"]}], "max_tokens": 24,
                "temperature": 0}
        api = json.loads(_raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())[2])
        assert reply.text_content() == api["choices"][0]["message"]["content"]
        expect(page.locator(".note")).to_have_text("(cut at the token limit)")

        # a request the server refuses: its error object's message is shown, the message is given back
        page.fill("#max-tokens", "100000")
        page.fill("#input", "second message")
        page.click("#send")
        expect(page.locator("#error")).to_contain_text("400: max_tokens is 100000, but this model's context is 512")
        expect(page.locator(".msg.user.failed")).to_have_text("second message")
        expect(page.locator("#input")).to_have_value("second message")
        assert page.locator(".msg.assistant").count() == 1

        page.click("#new")
        expect(page.locator(".msg")).to_have_count(0)
        expect(page.locator("#error")).to_be_hidden()
        browser.close()
