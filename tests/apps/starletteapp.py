"""A Starlette app served end to end: routing (mounts, trailing-slash redirects, behind a root
path), JSON, streaming, server-sent events, lifespan state and shutdown, errors."""

import asyncio
import contextlib
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Mount, Route


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"ready": True}
    say("STARLETTE LIFESPAN shutdown")


async def index(request: Request):
    return JSONResponse({"hello": "starlette"})


async def items(request: Request):
    data = await request.json()
    return JSONResponse({"n": data["n"] + 1}, status_code=201)


async def stream(request: Request):
    async def numbers():
        for i in range(3):
            yield f"{i}\n".encode()

    return StreamingResponse(numbers(), media_type="text/plain")


async def events(request: Request):
    """Server-sent events: `data: N` every ?interval= seconds, endlessly; logs EVENTS END tag
    when the stream stops."""
    interval = float(request.query_params.get("interval", "1"))
    tag = request.query_params.get("tag", "")

    async def numbers():
        try:
            n = 0
            while True:
                yield f"data: {n}\n\n"
                n += 1
                await asyncio.sleep(interval)
        finally:
            say(f"EVENTS END {tag}")

    return StreamingResponse(numbers(), media_type="text/event-stream")


async def state(request: Request):
    return JSONResponse({"ready": request.state.ready})


async def where(request: Request):
    return JSONResponse({"path": request.url.path, "root_path": request.scope["root_path"],
                         "url_for": str(request.url_for("leaf"))})


async def boom(request: Request):
    return 1 / 0


app = Starlette(lifespan=lifespan, routes=[
    Route("/", index), Route("/items", items, methods=["POST"]), Route("/stream", stream),
    Route("/events", events), Route("/state", state), Route("/boom", boom),
    Route("/where", where), Mount("/sub", routes=[Route("/leaf", where, name="leaf")]),
])


def with_spec_version(version: str, inner):
    """`inner` told that the server implements ASGI HTTP spec `version`."""

    async def app(scope, receive, send):
        if scope["type"] == "http":
            scope = dict(scope, asgi=dict(scope["asgi"], spec_version=version))
        await inner(scope, receive, send)

    return app


# Told 2.4, Starlette streams without watching for http.disconnect: it learns that the client
# left when send() raises, and raises its own ClientDisconnect from that.
app_spec_2_4 = with_spec_version("2.4", app)
