"""The dashboard in real headless Chromium (Debian's ``chromium``, driven by Playwright):
enqueue a long trigger, watch it run, press Cancel, see ``requested`` then ``cancelled``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from playwright.async_api import async_playwright, expect

from actors.http import create_app
from tests.helpers import make_trigger, open_host
from tests.servers import serve
from tests.system import chromium

if TYPE_CHECKING:
    from triggers import TriggerContext

pytestmark = pytest.mark.anyio

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
KIND = "demo.long"


async def long_work(intent: Any, ctx: TriggerContext) -> Any:
    """Streams a step every 50 ms for a long while, until cancelled."""
    with ctx.signal.scope():
        for step in range(100_000):
            await ctx.stream.write({"step": step})
            await anyio.sleep(0.05)
    return None


@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_cancel_from_the_dashboard(tmp_path: Path, token: str | None) -> None:
    """Enqueue from the page, see the intent turn running and stream, press Cancel: the page
    shows the answer ``requested`` and then the status ``cancelled``."""
    executable = chromium()
    async with (
        open_host(tmp_path, make_trigger(KIND, long_work)) as host,
        serve(create_app(host, token=token)) as url,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = await browser.new_page()
            await page.goto(url + (f"/?token={token}" if token else "/"))
            await expect(page.get_by_test_id("kind-select")).to_have_value(KIND)
            await page.get_by_test_id("actor-input").fill("chat:123")
            await page.get_by_test_id("payload-input").fill('{"job": "report"}')
            await page.get_by_test_id("enqueue-button").click()

            row = page.locator("tr[data-intent]").first
            await expect(row.get_by_test_id("status")).to_have_text("running", timeout=10_000)
            await expect(row.locator(".chunk")).to_contain_text("step", timeout=10_000)
            await expect(page.get_by_test_id("timeline")).to_contain_text("demo.long.requested")

            await row.get_by_test_id("cancel").click()
            await expect(row.get_by_test_id("cancel-answer")).to_have_text(
                "requested", timeout=10_000
            )
            await expect(row.get_by_test_id("status")).to_have_text("cancelled", timeout=10_000)
            await expect(page.get_by_test_id("timeline")).to_contain_text("test.cancelled")
            await expect(page.locator("#error")).to_have_text("")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=ARTIFACTS / f"dashboard-cancel-{token or 'open'}.png")
        finally:
            await browser.close()
        (state,) = await host.get("chat:123").intents()
        assert state.status == "cancelled"
        assert state.cancel_reason == "cancelled from the dashboard"
