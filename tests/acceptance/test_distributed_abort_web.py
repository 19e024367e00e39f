"""The distributed abort web flow in real headless Chromium: the page's Cancel button
(``POST /abort/{id}``) stops a long operation running in another process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from playwright.async_api import async_playwright, expect

from actors import ActorHost
from tests.servers import serve
from tests.system import chromium

if TYPE_CHECKING:
    from types import ModuleType

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "distributed_abort" / "web.py"
ARTIFACTS = ROOT / "test-artifacts"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("distributed_abort_web", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_cancel_button_stops_work_in_another_process(tmp_path: Path) -> None:
    """A worker process runs under controller ``task:report-7``; the page served by this
    process aborts it from the browser; the worker stops with the page's reason and the page
    shows the abort read back from the ledger."""
    example = load_example()
    executable = chromium()
    data_dir = tmp_path / "data"
    worker = await anyio.open_process(
        [sys.executable, str(EXAMPLE), "work", str(data_dir), example.TASK_ID],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert worker.stdout is not None
        lines = BufferedByteReceiveStream(worker.stdout)
        with anyio.fail_after(30):
            assert await lines.receive_until(b"\n", 1000) == b"working"
        async with (
            ActorHost(example.AgentDO, data_dir=data_dir) as host,
            serve(example.page_app(host)) as url,
            async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(executable_path=executable)
            try:
                page = await browser.new_page()
                await page.goto(f"{url}/task/{example.TASK_ID}")
                await expect(page.get_by_test_id("status")).to_have_text("running")
                await page.get_by_test_id("cancel").click()
                await expect(page.get_by_test_id("status")).to_have_text(
                    "cancelled: User clicked cancel", timeout=10_000
                )
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=ARTIFACTS / "distributed-abort-web.png")
            finally:
                await browser.close()
        with anyio.fail_after(30):
            stopped = await lines.receive_until(b"\n", 1000)
            assert stopped == b"stopped: User clicked cancel"
            assert await worker.wait() == 0
    finally:
        if worker.returncode is None:
            worker.kill()
        with anyio.CancelScope(shield=True):
            await worker.aclose()
