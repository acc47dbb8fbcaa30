"""An app whose import never finishes (within any test's patience)."""

import time

time.sleep(60)


def app(environ, start_response):
    raise AssertionError("never reached")
