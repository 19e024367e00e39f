"""The dashboard in real headless Chromium (Debian's ``chromium``, driven by Playwright):
enqueue a long trigger, watch it run, press Cancel, see ``requested`` then ``cancelled``."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from playwright.async_api import async_playwright, expect

from actors.http import create_app
from ledger import ledger_relpath
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


async def test_the_timeline_recovers_once_the_ledger_can_be_read_again(tmp_path: Path) -> None:
    """Selecting an actor whose ledger cannot be read shows why (the stream answers 503, and
    the browser gives that stream up); once the file is good again the page opens the
    timeline anew and shows the actor's events, with no reload."""
    executable = chromium()
    later = datetime(2100, 1, 1, tzinfo=UTC)
    async with (
        open_host(tmp_path, make_trigger(KIND, long_work), max_open_ledgers=1) as host,
        serve(create_app(host)) as url,
        async_playwright() as playwright,
    ):
        await host.get("a").enqueue_trigger(trigger_kind=KIND, at=later)
        await host.get("b").enqueue_trigger(trigger_kind=KIND, at=later)  # "a" hibernates
        path = host.data_dir / ledger_relpath("a")
        good = path.read_bytes()
        path.write_bytes(b"\xff" * 4096)
        browser = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = await browser.new_page()
            await page.goto(url + "/")
            await page.locator('#actors button[data-actor="a"]').click()
            error = page.locator("#error")
            # Why, from whichever answer came last: the refused timeline, or the intents
            # request's error (the server's own words about the file).
            why = re.compile("cannot be read now|is corrupt or foreign")
            await expect(error).to_contain_text(why, timeout=10_000)
            path.write_bytes(good)
            timeline = page.get_by_test_id("timeline")
            await expect(timeline).to_contain_text(f"{KIND}.requested", timeout=10_000)
            await expect(error).to_have_text("")
        finally:
            await browser.close()
