"""One-file Django project of the differential tests (tests/test_differential.py).

The same views are served two ways: `application` (Django's WSGI handler; forkserve against
gunicorn) and `asgi_application` (Django's ASGI handler; forkserve against uvicorn). Every app
of those tests (diff_flask, diff_django, diff_starlette) has the same routes with the same
meaning; see CASES in tests/test_differential.py. Views that report what the app saw of the
request answer JSON. No database, no middleware; exceptions propagate to the server
(DEBUG_PROPAGATE_EXCEPTIONS), which must answer them itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from django.conf import settings

settings.configure(
    DEBUG=False,
    DEBUG_PROPAGATE_EXCEPTIONS=True,
    SECRET_KEY="forkserve-differential-tests-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    DATABASES={},
    DATA_UPLOAD_MAX_MEMORY_SIZE=8 * 1024 * 1024,  # the 2 MiB body of /hash and /echo
)

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.handlers.asgi import ASGIRequest  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import (  # noqa: E402
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseNotModified,
    HttpResponsePermanentRedirect,
    HttpResponseRedirect,
    JsonResponse,
    StreamingHttpResponse,
)
from django.urls import path, re_path  # noqa: E402

# The file that /file serves: this module's own source (same path, size and mtime for both
# servers).
FILE = Path(__file__).resolve()
# A fixed expiry, so that Set-Cookie does not depend on the clock (a datetime would make
# Django compute Max-Age from the current time).
EXPIRES = "Tue, 19 Jan 2038 03:14:07 GMT"
PIECES = [b"piece %d\n" % i for i in range(5)]
# Valid but unusual response header values: obs-text (a latin-1 byte), a tab inside, empty.
ODD_HEADERS = {"X-Latin": "caf\u00e9", "X-Tab": "a\tb  c", "X-Empty": "",
               "Link": '<https://example.com/a, b>; rel="preload"; as="style"'}


def _stream(request: HttpRequest, pieces: list[bytes], fail: bool
            ) -> Iterator[bytes] | AsyncIterator[bytes]:
    """`pieces`, then RuntimeError if `fail`: a generator under WSGI, an async one under ASGI
    (Django's ASGI handler would otherwise read a sync generator to its end before sending)."""
    def sync() -> Iterator[bytes]:
        yield from pieces
        if fail:
            raise RuntimeError("deliberate failure in the middle of the stream")

    async def asynchronous() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
        if fail:
            raise RuntimeError("deliberate failure in the middle of the stream")

    return asynchronous() if isinstance(request, ASGIRequest) else sync()


def text(request: HttpRequest) -> HttpResponse:
    return HttpResponse("hello, world\n", content_type="text/plain; charset=utf-8",
                        headers={"X-Diff": "a, b;  c"})


def headers(request: HttpRequest) -> HttpResponse:
    return HttpResponse("odd headers\n", content_type="text/plain", headers=ODD_HEADERS)


def json_view(request: HttpRequest) -> HttpResponse:
    data = json.loads(request.body)
    return JsonResponse({"got": data, "n": data["n"] + 1, "text": "h\u00e9llo \u2713"})


def cookies_set(request: HttpRequest) -> HttpResponse:
    response = HttpResponse("cookies set\n", content_type="text/plain")
    response.set_cookie("session", "abc def")  # a space: the value gets quoted
    response.set_cookie("quoted", '"already quoted"')
    response.set_cookie("list", "a,b;c")
    response.set_cookie("expiring", "soon", max_age=3600, expires=EXPIRES, path="/cookies",
                        secure=True, httponly=True, samesite="Lax")
    return response


def cookies_delete(request: HttpRequest) -> HttpResponse:
    response = JsonResponse(sorted(request.COOKIES.items()), safe=False)
    response.delete_cookie("session")
    response.delete_cookie("expiring", path="/cookies")
    return response


def redirect_301(request: HttpRequest) -> HttpResponse:
    return HttpResponsePermanentRedirect("/text")


def redirect_302(request: HttpRequest) -> HttpResponse:
    return HttpResponseRedirect(request.build_absolute_uri("/text?q=a%20b"))  # from Host


def redirect_307(request: HttpRequest) -> HttpResponse:
    response = HttpResponseRedirect("../text?from=307")
    response.status_code = 307
    return response


def empty(request: HttpRequest) -> HttpResponse:
    return HttpResponse(status=204, headers={"X-Empty": "yes"})


def not_modified(request: HttpRequest) -> HttpResponse:
    if request.headers.get("If-None-Match") == '"v1"':
        return HttpResponseNotModified(headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})
    return HttpResponse("fresh\n", headers={"ETag": '"v1"'})


def stream(request: HttpRequest) -> HttpResponse:
    return StreamingHttpResponse(_stream(request, PIECES, fail=False),
                                 content_type="text/plain")


def stream_error(request: HttpRequest) -> HttpResponse:
    """Sends a first part, then fails; ?length=N declares a Content-Length of N first."""
    response = StreamingHttpResponse(_stream(request, [b"first part\n"], fail=True),
                                     content_type="text/plain")
    if "length" in request.GET:
        response["Content-Length"] = request.GET["length"]
    return response


def error(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("deliberate failure before the response starts")


def file(request: HttpRequest) -> HttpResponse:
    return FileResponse(FILE.open("rb"), content_type="text/x-python")


def path_view(request: HttpRequest, rest: str) -> HttpResponse:
    return JsonResponse({"rest": rest, "path": request.path, "path_info": request.path_info,
                         "full_path": request.get_full_path(),
                         "meta_path_info": request.META["PATH_INFO"],
                         "script_name": request.META["SCRIPT_NAME"],
                         "raw_uri": request.META.get("RAW_URI")})


def query(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"args": [[k, v] for k, values in request.GET.lists() for v in values],
                         "query_string": request.META["QUERY_STRING"]})


def form(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"form": [[k, v] for k, vs in request.POST.lists() for v in vs]})


def upload(request: HttpRequest) -> HttpResponse:
    files = [{"field": name, "filename": f.name, "type": f.content_type,
              "sha256": hashlib.sha256(f.read()).hexdigest()}
             for name, fs in request.FILES.lists() for f in fs]
    return JsonResponse({"form": [[k, v] for k, vs in request.POST.lists() for v in vs],
                         "files": files})


def hash_body(request: HttpRequest) -> HttpResponse:
    body = request.body
    return JsonResponse({"length": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                         "content_length": request.META.get("CONTENT_LENGTH")})


def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type="application/octet-stream")


urlpatterns = [
    path("text", text), path("headers", headers), path("json", json_view),
    path("cookies/set", cookies_set), path("cookies/delete", cookies_delete),
    path("redirect/301", redirect_301), path("redirect/302", redirect_302),
    path("redirect/307", redirect_307), path("empty", empty),
    path("not-modified", not_modified), path("stream", stream),
    path("stream-error", stream_error), path("error", error), path("file", file),
    re_path(r"^path/(?P<rest>.*)$", path_view), path("query", query), path("form", form),
    path("upload", upload), path("hash", hash_body), path("echo", echo),
]

application = get_wsgi_application()
asgi_application = get_asgi_application()
