"""Starlette (ASGI) app of the differential tests (tests/test_differential.py), served by
forkserve and by uvicorn, whose answers must agree.

Every app of those tests (diff_flask, diff_django, diff_starlette) has the same routes with the
same meaning; see CASES in tests/test_differential.py. Views that report what the app saw of
the request answer JSON. An exception is answered by Starlette's ServerErrorMiddleware (a
plain 500) and then re-raised to the server, which must not answer a second time.

Forms are parsed with the standard library (urllib.parse, email), not request.form(): that
needs python-multipart, which is not among the test dependencies. What is compared is what
the server handed the app, and the bytes are the same either way.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

# The file that /file serves: this module's own source (same path, size and mtime for both
# servers, so the validators that Starlette derives from them agree).
FILE = Path(__file__).resolve()
# Fixed dates, so that Set-Cookie does not depend on the clock.
EXPIRES = datetime(2038, 1, 19, 3, 14, 7, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
PIECES = [b"piece %d\n" % i for i in range(5)]
# Valid but unusual response header values: obs-text (a latin-1 byte), a tab inside, empty.
ODD_HEADERS = {"X-Latin": "caf\u00e9", "X-Tab": "a\tb  c", "X-Empty": "",
               "Link": '<https://example.com/a, b>; rel="preload"; as="style"'}


async def text(request: Request) -> Response:
    return PlainTextResponse("hello, world\n", headers={"X-Diff": "a, b;  c"})


async def headers(request: Request) -> Response:
    return PlainTextResponse("odd headers\n", headers=ODD_HEADERS)


async def json_view(request: Request) -> Response:
    data = await request.json()
    return JSONResponse({"got": data, "n": data["n"] + 1, "text": "h\u00e9llo \u2713"})


async def cookies_set(request: Request) -> Response:
    response = PlainTextResponse("cookies set\n")
    response.set_cookie("session", "abc def")  # a space: the value gets quoted
    response.set_cookie("quoted", '"already quoted"')
    response.set_cookie("list", "a,b;c")
    response.set_cookie("expiring", "soon", max_age=3600, expires=EXPIRES, path="/cookies",
                        secure=True, httponly=True, samesite="lax")
    return response


async def cookies_delete(request: Request) -> Response:
    response = JSONResponse(sorted(request.cookies.items()))
    # Not response.delete_cookie(): it sets `expires=0`, which SimpleCookie renders as the
    # current time, so two answers a second apart would differ. The same deletion, dated.
    response.set_cookie("session", "", max_age=0, expires=EPOCH)
    response.set_cookie("expiring", "", max_age=0, expires=EPOCH, path="/cookies")
    return response


async def redirect_301(request: Request) -> Response:
    return RedirectResponse("/text", 301)


async def redirect_302(request: Request) -> Response:
    url = request.url_for("text").include_query_params(q="a b")  # absolute, from Host
    return RedirectResponse(str(url), 302)


async def redirect_307(request: Request) -> Response:
    return RedirectResponse("../text?from=307", 307)


async def empty(request: Request) -> Response:
    return Response(status_code=204, headers={"X-Empty": "yes"})


async def not_modified(request: Request) -> Response:
    if request.headers.get("if-none-match") == '"v1"':
        return Response(status_code=304, headers={"ETag": '"v1"',
                                                  "Cache-Control": "max-age=60"})
    return PlainTextResponse("fresh\n", headers={"ETag": '"v1"'})


async def stream(request: Request) -> Response:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in PIECES:
            yield piece

    return StreamingResponse(pieces(), media_type="text/plain")


async def stream_error(request: Request) -> Response:
    """Sends a first part, then fails; ?length=N declares a Content-Length of N first."""
    async def pieces() -> AsyncIterator[bytes]:
        yield b"first part\n"
        raise RuntimeError("deliberate failure in the middle of the stream")

    length = request.query_params.get("length")
    return StreamingResponse(pieces(), media_type="text/plain",
                             headers={"Content-Length": length} if length else None)


async def error(request: Request) -> Response:
    raise RuntimeError("deliberate failure before the response starts")


async def file(request: Request) -> Response:
    return FileResponse(FILE, media_type="text/x-python")


async def path(request: Request) -> Response:
    return JSONResponse({"rest": request.path_params["rest"], "path": request.url.path,
                         "scope_path": request.scope["path"],
                         "raw_path": request.scope["raw_path"].decode("latin-1"),
                         "root_path": request.scope["root_path"]})


async def query(request: Request) -> Response:
    return JSONResponse({"args": request.query_params.multi_items(),
                         "query_string": request.scope["query_string"].decode("latin-1")})


async def form(request: Request) -> Response:
    return JSONResponse({"form": parse_qsl((await request.body()).decode(),
                                           keep_blank_values=True)})


async def upload(request: Request) -> Response:
    head = b"Content-Type: %s\r\n\r\n" % request.headers["content-type"].encode("latin-1")
    message = BytesParser(policy=HTTP).parsebytes(head + await request.body())
    fields, files = [], []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if part.get_filename() is None:
            fields.append([name, payload.decode()])
        else:
            files.append({"field": name, "filename": part.get_filename(),
                          "type": part.get_content_type(),
                          "sha256": hashlib.sha256(payload).hexdigest()})
    return JSONResponse({"form": fields, "files": files})


async def hash_body(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                         "content_length": request.headers.get("content-length")})


async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


app = Starlette(routes=[
    Route("/text", text, name="text"), Route("/headers", headers),
    Route("/json", json_view, methods=["POST"]),
    Route("/cookies/set", cookies_set), Route("/cookies/delete", cookies_delete),
    Route("/redirect/301", redirect_301), Route("/redirect/302", redirect_302),
    Route("/redirect/307", redirect_307, methods=["POST"]), Route("/empty", empty),
    Route("/not-modified", not_modified), Route("/stream", stream),
    Route("/stream-error", stream_error), Route("/error", error), Route("/file", file),
    Route("/path/{rest:path}", path), Route("/query", query),
    Route("/form", form, methods=["POST"]), Route("/upload", upload, methods=["POST"]),
    Route("/hash", hash_body, methods=["POST"]), Route("/echo", echo, methods=["POST"]),
])
