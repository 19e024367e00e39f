"""The web flow: a page's Cancel button stops a long operation running in another process.

    .venv/bin/python examples/distributed_abort/web.py [DATA_DIR] [--port PORT]

starts a worker process running a long operation under the distributed abort controller
``task:report-7``, serves the HTTP API (with ``POST /abort/{id}``) and a page at
``http://127.0.0.1:8000/task/task:report-7`` with a Cancel button (``--port 0`` picks a free
port; the page's address is printed). Press it: the worker stops, the page shows the abort,
and this process ends.

Ctrl-C or SIGTERM stops both processes in order, as ``actors serve`` stops: the server
finishes its open requests, the host is left, the worker is stopped and waited for, and the
exit code is 130 or 143. The worker runs in a session of its own (a Ctrl-C in the terminal
reaches only this process, which stops it) and reads its standard input, a pipe this process
holds: when this process is gone, however it ended (``SIGKILL`` included), the pipe closes
and the worker stops too, so it is never left running on its own.

``web.py work DATA_DIR ID`` runs the worker alone (Ctrl-C or SIGTERM stops it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream
from fastapi.responses import HTMLResponse

from actors import ActorHost, define_agent_do
from actors.http import close_streams, create_app
from triggers import AbortController, AbortError, AbortSignal, DistributedAbortController

if TYPE_CHECKING:
    import uvicorn
    from anyio.abc import Process, TaskStatus
    from fastapi import FastAPI

AgentDO = define_agent_do()
TASK_ID = "task:report-7"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
WORKER_GRACE = 10.0
"""Seconds the worker gets to stop once told, before it is killed."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{id}</title></head>
<body style="font-family: system-ui, sans-serif">
<h1>Report {id}</h1>
<p>A long operation runs in another process under this abort controller.</p>
<button id="cancel" data-testid="cancel">Cancel</button>
<p id="status" data-testid="status">running</p>
<script>
const id = {id_json};
const enc = encodeURIComponent;
document.getElementById("cancel").addEventListener("click", async () => {{
  const response = await fetch(`/abort/${{enc(id)}}`, {{
    method: "POST",
    headers: {{ "Content-Type": "application/json" }},
    body: JSON.stringify({{ reason: "User clicked cancel" }}),
  }});
  document.getElementById("status").textContent = response.ok ? "abort sent" : "abort failed";
  poll();
}});
async function poll() {{
  const kinds = "trigger.abort_controller.aborted";
  const response = await fetch(`/actors/${{enc(id)}}/events?kinds=${{kinds}}`);
  const events = response.ok ? await response.json() : [];
  if (events.length) {{
    document.getElementById("status").textContent = "cancelled: " + events[0].payload.reason;
  }} else {{
    setTimeout(poll, 200);
  }}
}}
</script>
</body></html>
"""


def page_app(host: ActorHost) -> FastAPI:
    """The HTTP API of ``host`` plus the task page at ``/task/{id}``."""
    app = create_app(host)

    @app.get("/task/{id}", response_class=HTMLResponse, include_in_schema=False)
    async def task_page(id: str) -> HTMLResponse:
        return HTMLResponse(PAGE.format(id=escape(id), id_json=json.dumps(id)))

    return app


# -- the worker -------------------------------------------------------------------------------


def tell(line: str) -> None:
    """Print ``line`` at once; quietly nothing if the reader of the output is gone."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        # Python would meet the closed pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


async def abort_on_signal(
    local: AbortController, received: list[int], *, task_status: TaskStatus[None]
) -> None:
    """Abort ``local`` on SIGINT or SIGTERM."""
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            received.append(signum)
            local.abort(f"{signal.Signals(signum).name} received")
            return


async def abort_when_stdin_closes(local: AbortController) -> None:
    """Abort ``local`` when standard input reaches its end: the process that holds the other
    end of the pipe closed it, or is gone."""
    fd = sys.stdin.fileno()
    while True:
        await anyio.wait_readable(fd)
        if not os.read(fd, 4096):
            local.abort("the web process stopped")
            return


async def work(data_dir: str, id: str, *, watch_stdin: bool = False) -> int:
    """The worker: a long operation that stops when the controller ``id`` is aborted, on
    SIGINT or SIGTERM, or (``watch_stdin``) when its standard input closes. Returns the exit
    code: 0, or 128 + the signal that stopped it."""
    received: list[int] = []
    async with ActorHost(AgentDO, data_dir=data_dir, run_scheduler=False) as host:
        controller = await DistributedAbortController.create(id, host=host)
        local = AbortController()
        async with anyio.create_task_group() as tg:
            await tg.start(abort_on_signal, local, received)
            if watch_stdin:
                tg.start_soon(abort_when_stdin_closes, local)
            tell("working")
            try:
                with AbortSignal.any([controller.signal, local.signal]).scope():
                    step = 0
                    while True:
                        await anyio.sleep(0.1)
                        step += 1
            except AbortError as error:
                tell(f"stopped: {error.reason}")
            tg.cancel_scope.cancel()
    return 128 + received[0] if received else 0


# -- the web process --------------------------------------------------------------------------


def listen(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` (0: a free port), before the server starts,
    so the address printed is the real one and early requests wait in the backlog."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


async def serve_until_cancelled(server: uvicorn.Server, sock: socket.socket, app: FastAPI) -> None:
    """Run ``server`` until it exits or this task is cancelled; then let it stop in order.

    Cut off by the cancellation, uvicorn would end the app's lifespan with a
    ``CancelledError`` traceback. Shielded, it is told to exit instead (after the app's
    server-sent event streams are ended, so it need not wait for them): it stops accepting,
    finishes the open requests, ends the lifespan, and the cancellation goes on from here.
    """
    finished = anyio.Event()

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):
                await server.serve([sock])
        finally:
            finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            await finished.wait()
        finally:
            close_streams(app)
            server.should_exit = True


async def stop_on_signal(
    stop: anyio.CancelScope, received: list[int], *, task_status: TaskStatus[None]
) -> None:
    """Cancel ``stop`` on the first SIGINT or SIGTERM."""
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            received.append(signum)
            stop.cancel()
            return


async def echo_worker(lines: BufferedByteReceiveStream) -> bool:
    """Print the worker's next line; False if it has ended its output instead."""
    try:
        line = await lines.receive_until(b"\n", 10_000)
    except (anyio.EndOfStream, anyio.IncompleteRead):
        return False
    print("worker:", line.decode(errors="replace"), flush=True)
    return True


async def stop_worker(worker: Process, lines: BufferedByteReceiveStream) -> int:
    """Close the worker's standard input (it then stops), show what it says last, wait for
    it; kill it if it has not ended after ``WORKER_GRACE`` seconds. Returns its exit code."""
    with anyio.CancelScope(shield=True):
        assert worker.stdin is not None
        await worker.stdin.aclose()
        with anyio.move_on_after(WORKER_GRACE):
            while await echo_worker(lines):
                pass
            await worker.wait()
        if worker.returncode is None:
            worker.kill()
        await worker.aclose()
    assert worker.returncode is not None
    return worker.returncode


async def main(data_dir: str, port: int) -> int:
    """Start the worker, serve the page until the worker stops (or a signal); returns the exit
    code: 0, 1 if the worker failed, 2 if the port is taken, or 128 + the signal that stopped
    this process."""
    try:
        sock = listen(port)
    except OSError as exc:
        print(f"web.py: cannot listen on 127.0.0.1:{port}: {exc.strerror} (--port 0 picks a "
              "free port)", file=sys.stderr)  # fmt: skip
        return 2
    received: list[int] = []
    stop = anyio.CancelScope()
    with sock:
        async with anyio.create_task_group() as tg:
            await tg.start(stop_on_signal, stop, received)
            worker = await anyio.open_process(
                [sys.executable, __file__, "work", data_dir, TASK_ID, "--watch-stdin"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                start_new_session=True,
            )
            assert worker.stdout is not None
            lines = BufferedByteReceiveStream(worker.stdout)
            try:
                async with ActorHost(AgentDO, data_dir=data_dir) as host:
                    # A signal cancels what runs in ``stop``; the host is then left in order.
                    with stop:
                        await serve_page(host, lines, sock)
            finally:
                worker_code = await stop_worker(worker, lines)
            tg.cancel_scope.cancel()
    if received:
        return 128 + received[0]
    return 0 if worker_code == 0 else 1


async def serve_page(
    host: ActorHost, lines: BufferedByteReceiveStream, sock: socket.socket
) -> None:
    """Serve the page on ``sock`` until the worker has said it stopped (or ended)."""
    import uvicorn

    if not await echo_worker(lines):  # "working"
        return
    app = page_app(host)
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/task/{TASK_ID}"
    print(f"open {url} and press Cancel (Ctrl-C to quit)", flush=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_until_cancelled, uvicorn.Server(config), sock, app)
        await echo_worker(lines)  # "stopped: ..."
        tg.cancel_scope.cancel()


def run() -> int:
    """The command line (see the module's docstring); returns the exit code."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if len(sys.argv) > 1 and sys.argv[1] == "work":
        worker = argparse.ArgumentParser(prog="web.py work")
        worker.add_argument("data_dir")
        worker.add_argument("id")
        worker.add_argument("--watch-stdin", action="store_true", help="stop when stdin closes")
        args = worker.parse_args(sys.argv[2:])
        return anyio.run(
            functools.partial(work, watch_stdin=args.watch_stdin), args.data_dir, args.id
        )
    parser = argparse.ArgumentParser(prog="web.py", description="the distributed abort web flow")
    parser.add_argument("data_dir", nargs="?", help="a new temporary directory if not given")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args()
    directory = args.data_dir or tempfile.mkdtemp(prefix="dac-web-")
    return anyio.run(main, str(Path(directory)), args.port)


if __name__ == "__main__":
    try:
        sys.exit(run())
    except KeyboardInterrupt:  # a second Ctrl-C while stopping: stop at once
        sys.exit(130)
