"""Flask app of the differential tests (tests/test_differential.py), served by forkserve and
by gunicorn, whose answers must agree.

Every app of those tests (diff_flask, diff_django, diff_starlette) has the same routes with the
same meaning; see CASES in tests/test_differential.py. Views that report what the app saw of
the request answer JSON. Errors are not handled by Flask (PROPAGATE_EXCEPTIONS), so they reach
the server, which must answer them itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from flask import Flask, Response, jsonify, redirect, request, send_file, url_for

app = Flask(__name__)
app.config["PROPAGATE_EXCEPTIONS"] = True  # an exception reaches the WSGI server

# The file that /file serves: this module's own source (same path, size and mtime for both
# servers, so the validators that Flask derives from them agree).
FILE = Path(__file__).resolve()
# A fixed expiry, so that Set-Cookie does not depend on the clock.
EXPIRES = datetime(2038, 1, 19, 3, 14, 7, tzinfo=timezone.utc)
PIECES = [b"piece %d\n" % i for i in range(5)]
# Valid but unusual response header values: obs-text (a latin-1 byte), a tab inside, empty.
ODD_HEADERS = {"X-Latin": "caf\u00e9", "X-Tab": "a\tb  c", "X-Empty": "",
               "Link": '<https://example.com/a, b>; rel="preload"; as="style"'}


@app.get("/text")
def text() -> Response:
    return Response("hello, world\n", content_type="text/plain; charset=utf-8",
                    headers={"X-Diff": "a, b;  c"})


@app.get("/headers")
def headers() -> Response:
    return Response("odd headers\n", content_type="text/plain", headers=ODD_HEADERS)


@app.post("/json")
def json_view() -> Response:
    data = request.get_json()
    return jsonify(got=data, n=data["n"] + 1, text="h\u00e9llo \u2713")


@app.get("/cookies/set")
def cookies_set() -> Response:
    response = Response("cookies set\n", content_type="text/plain")
    response.set_cookie("session", "abc def")  # a space: the value gets quoted
    response.set_cookie("quoted", '"already quoted"')
    response.set_cookie("list", "a,b;c")
    response.set_cookie("expiring", "soon", max_age=3600, expires=EXPIRES, path="/cookies",
                        secure=True, httponly=True, samesite="Lax")
    return response


@app.get("/cookies/delete")
def cookies_delete() -> Response:
    response = jsonify(sorted(request.cookies.items(multi=True)))
    response.delete_cookie("session")
    response.delete_cookie("expiring", path="/cookies")
    return response


@app.get("/redirect/301")
def redirect_301() -> Response:
    return redirect("/text", 301)


@app.get("/redirect/302")
def redirect_302() -> Response:
    return redirect(url_for("text", q="a b", _external=True), 302)  # absolute, from Host


@app.post("/redirect/307")
def redirect_307() -> Response:
    return redirect("../text?from=307", 307)


@app.get("/empty")
def empty() -> Response:
    return Response(status=204, headers={"X-Empty": "yes"})


@app.get("/not-modified")
def not_modified() -> Response:
    if request.headers.get("If-None-Match") == '"v1"':
        return Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})
    return Response("fresh\n", headers={"ETag": '"v1"'})


@app.get("/stream")
def stream() -> Response:
    return Response(iter(PIECES), content_type="text/plain")


@app.get("/stream-error")
def stream_error() -> Response:
    """Sends a first part, then fails; ?length=N declares a Content-Length of N first."""
    def pieces() -> Iterator[bytes]:
        yield b"first part\n"
        raise RuntimeError("deliberate failure in the middle of the stream")

    response = Response(pieces(), content_type="text/plain")
    if "length" in request.args:
        response.headers["Content-Length"] = request.args["length"]
    return response


@app.get("/error")
def error() -> Response:
    raise RuntimeError("deliberate failure before the response starts")


@app.get("/file")
def file() -> Response:
    return send_file(FILE, mimetype="text/x-python")


@app.get("/path/<path:rest>")
def path(rest: str) -> Response:
    return jsonify(rest=rest, path=request.path, full_path=request.full_path,
                   path_info=request.environ["PATH_INFO"],
                   script_name=request.environ["SCRIPT_NAME"],
                   raw_uri=request.environ.get("RAW_URI"))


@app.get("/query")
def query() -> Response:
    return jsonify(args=list(request.args.items(multi=True)),
                   query_string=request.environ["QUERY_STRING"])


@app.post("/form")
def form() -> Response:
    return jsonify(form=list(request.form.items(multi=True)))


@app.post("/upload")
def upload() -> Response:
    files = [{"field": name, "filename": f.filename, "type": f.content_type,
              "sha256": hashlib.sha256(f.read()).hexdigest()}
             for name, f in request.files.items(multi=True)]
    return jsonify(form=list(request.form.items(multi=True)), files=files)


@app.post("/hash")
def hash_body() -> Response:
    body = request.get_data()
    return jsonify(length=len(body), sha256=hashlib.sha256(body).hexdigest(),
                   content_length=request.content_length)


@app.post("/echo")
def echo() -> Response:
    return Response(request.get_data(), content_type="application/octet-stream")
