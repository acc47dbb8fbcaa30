"""Says which process imported it, so a test can check the master never does."""

import os
import sys

print(f"importmark imported by pid {os.getpid()}", file=sys.stderr, flush=True)


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
