"""A Starlette app served end to end: routing, JSON, streaming, lifespan state, errors."""

import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"ready": True}


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


async def state(request: Request):
    return JSONResponse({"ready": request.state.ready})


async def boom(request: Request):
    return 1 / 0


app = Starlette(lifespan=lifespan, routes=[
    Route("/", index), Route("/items", items, methods=["POST"]), Route("/stream", stream),
    Route("/state", state), Route("/boom", boom),
])
