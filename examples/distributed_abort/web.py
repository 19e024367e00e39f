"""The web flow: a page's Cancel button stops a long operation running in another process.

    .venv/bin/python examples/distributed_abort/web.py [DATA_DIR]

starts a worker process running a long operation under the distributed abort controller
``task:report-7``, serves the HTTP API (with ``POST /abort/{id}``) and a page at
``http://127.0.0.1:8000/task/task:report-7`` with a Cancel button. Press it: the worker stops
and the page shows the abort. ``web.py work DATA_DIR ID`` runs the worker alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import structlog
from fastapi.responses import HTMLResponse

from actors import ActorHost, define_agent_do
from actors.http import create_app
from triggers import AbortError, DistributedAbortController

if TYPE_CHECKING:
    from fastapi import FastAPI

AgentDO = define_agent_do()
TASK_ID = "task:report-7"

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


async def work(data_dir: str, id: str) -> None:
    """The worker: a long operation that stops when the controller ``id`` is aborted."""
    async with ActorHost(AgentDO, data_dir=data_dir, run_scheduler=False) as host:
        controller = await DistributedAbortController.create(id, host=host)
        print("working", flush=True)
        try:
            with controller.signal.scope():
                step = 0
                while True:
                    await anyio.sleep(0.1)
                    step += 1
        except AbortError as error:
            print(f"stopped: {error.reason}", flush=True)


async def main(data_dir: str) -> None:
    import uvicorn

    worker = subprocess.Popen(
        [sys.executable, __file__, "work", data_dir, TASK_ID], stdout=subprocess.PIPE, text=True
    )
    assert worker.stdout is not None
    print("worker:", await anyio.to_thread.run_sync(worker.stdout.readline), end="")
    async with ActorHost(AgentDO, data_dir=data_dir) as host:
        config = uvicorn.Config(page_app(host), host="127.0.0.1", port=8000, log_config=None)
        print(f"open http://127.0.0.1:8000/task/{TASK_ID} and press Cancel (Ctrl-C to quit)")
        async with anyio.create_task_group() as tg:
            tg.start_soon(uvicorn.Server(config).serve)
            print("worker:", await anyio.to_thread.run_sync(worker.stdout.readline), end="")
            tg.cancel_scope.cancel()
    worker.wait(timeout=30)


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if len(sys.argv) == 4 and sys.argv[1] == "work":
        anyio.run(work, sys.argv[2], sys.argv[3])
    else:
        directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dac-web-")
        anyio.run(main, str(Path(directory)))
