"""The HTTP API and dashboard of an ``ActorHost`` (needs the ``http`` extra: FastAPI, uvicorn).

::

    from actors.http import create_app

    async with ActorHost(ChatDO, data_dir="./data") as host:
        app = create_app(host, token="s3cret")
        config = uvicorn.Config(app, host="127.0.0.1", port=8000)
        await uvicorn.Server(config).serve()

Routes: ``POST /actors/{actor}/triggers/{kind}`` (enqueue),
``POST /actors/{actor}/triggers/{kind}/{intent_event_id}/cancel``, ``GET /actors``,
``GET /actors/{actor}/intents[/{id}]``, ``GET /actors/{actor}/events``, server-sent events at
``GET /actors/{actor}/events/stream`` and ``GET /actors/{actor}/intents/{id}/stream``,
``POST /abort/{id}``, and the dashboard at ``/``. Errors are JSON ``{"error": code, "message":
..., "details": [...]}``.

A server-sent event stream follows its actor or intent until the client leaves: when your
server stops, call ``close_streams(app)`` first so it need not wait for them.
"""

from ._http import MAX_BODY as MAX_BODY
from ._http import close_streams as close_streams
from ._http import create_app as create_app

__all__ = ["MAX_BODY", "close_streams", "create_app"]
