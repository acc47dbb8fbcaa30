"""Boots fine, then the worker dies 0.3 s later, every time: a crash loop."""

import os
import threading

threading.Timer(0.3, os._exit, (7,)).start()


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
