"""The event loop a worker runs (--loop): uvloop's or asyncio's own; and the tasks an app
left running on it when the worker stops.
"""

from __future__ import annotations

import asyncio

# Imported here, in the master, so that the workers share its pages (PSS).
try:
    import uvloop
except ImportError:  # asyncio's own loop then
    uvloop = None


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """An event loop of `kind`: 'uvloop', 'asyncio', or 'auto' (uvloop when installed).
    Raises ImportError for 'uvloop' without uvloop."""
    if kind in ("auto", "uvloop"):
        if uvloop is not None:
            return uvloop.new_event_loop()
        if kind == "uvloop":
            raise ImportError("uvloop is not installed")
    return asyncio.new_event_loop()


def cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel tasks still running when the worker stops (an app's background work)."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
