"""A Python config file: settings by name, and every server hook, each logging its call."""

import os
import sys

workers = 2
timeout = 20
access_logfile = None


def _say(text):
    print(f"HOOK {text}", file=sys.stderr, flush=True)


def on_starting(server):
    _say(f"on_starting master={os.getpid()} size={server.size}")


def when_ready(server):
    _say(f"when_ready master={os.getpid()}")


def pre_fork(server, worker):
    _say(f"pre_fork in={os.getpid()} number={worker.number}")


def post_fork(server, worker):
    _say(f"post_fork in={os.getpid()} number={worker.number}")


def worker_exit(server, worker):
    _say(f"worker_exit in={os.getpid()} number={worker.number}")


def on_reload(server):
    _say(f"on_reload master={os.getpid()}")
    raise RuntimeError("a broken on_reload hook must not stop the server")
