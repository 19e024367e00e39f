"""The distributed abort web flow in real headless Chromium: the page's Cancel button
(``POST /abort/{id}``) stops a long operation running in another process. And ``web.py``
run as a real process: it ends with its worker, and stops it on a signal, cleanly."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
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


def start_web(tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    """``web.py DATA_DIR --port 0`` in a session of its own (its process group, as a terminal
    has it), once it serves; and the page's address. Its worker inherits its stderr pipe."""
    web = subprocess.Popen(
        [sys.executable, str(EXAMPLE), str(tmp_path / "data"), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert web.stdout is not None
    assert web.stdout.readline() == "worker: working\n"
    opened = re.fullmatch(
        r"open (http://\S+)/task/\S+ and press Cancel \(Ctrl-C to quit\)\n", web.stdout.readline()
    )
    assert opened is not None
    return web, opened[1]


def finish(web: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of the output and errors, once ``web.py`` has ended: the end of its stderr
    pipe, which its worker holds too, so once both have ended (or fail, killing both)."""
    try:
        return web.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(web.pid, signal.SIGKILL)
        out, err = web.communicate(timeout=30)
        pytest.fail(f"web.py or its worker did not end:\n{out}\n{err}")


def test_web_py_ends_once_its_worker_is_aborted(tmp_path: Path) -> None:
    """``POST /abort/{id}`` to the address it prints stops the worker; web.py shows the
    worker's last line, stops serving and exits 0, with nothing on stderr."""
    web, url = start_web(tmp_path)
    try:
        answer = httpx.post(f"{url}/abort/task:report-7", json={"reason": "from the test"})
        assert answer.status_code == 200, answer.text
        out, err = finish(web)
    finally:
        if web.returncode is None:
            os.killpg(web.pid, signal.SIGKILL)
            web.communicate()
    assert out == "worker: stopped: from the test\n"
    assert web.returncode == 0
    assert err == ""


@pytest.mark.parametrize(
    ("signum", "to_the_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["Ctrl-C", "SIGTERM"],
)
def test_web_py_stops_its_worker_on_a_signal(
    tmp_path: Path, signum: int, to_the_group: bool
) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to web.py alone: the server
    stops in order (no traceback, no uvicorn lifespan ``CancelledError``), the worker is
    stopped and waited for (no ``KeyboardInterrupt`` in it), and the exit code is 128 + the
    signal."""
    web, _ = start_web(tmp_path)
    try:
        if to_the_group:
            os.killpg(web.pid, signum)
        else:
            web.send_signal(signum)
        out, err = finish(web)
    finally:
        if web.returncode is None:
            os.killpg(web.pid, signal.SIGKILL)
            web.communicate()
    assert out == "worker: stopped: the web process stopped\n"
    assert web.returncode == 128 + signum
    assert err == ""


def test_the_worker_ends_when_web_py_is_killed(tmp_path: Path) -> None:
    """web.py killed with SIGKILL cannot stop its worker: the worker notices that the pipe to
    web.py closed and ends by itself (the stderr pipe they share reaches its end), quietly."""
    web, _ = start_web(tmp_path)
    web.kill()
    _, err = finish(web)
    assert web.returncode == -signal.SIGKILL
    assert err == ""
