"""Reading TOML files (config files, --log-config), with the parser imported on first use:
most servers start without one, and the import costs each start about 8 ms."""

from __future__ import annotations

import sys
from typing import IO, Any


def load_toml(file: IO[bytes]) -> dict[str, Any]:
    """The document in binary `file`. Raises ValueError (tomllib's TOMLDecodeError, or a
    UnicodeDecodeError) for a file that is not valid TOML, or when no TOML parser is
    installed (Python 3.10 without tomli)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("reading TOML on Python 3.10 needs tomli (pip install tomli)") \
                from None
    return tomllib.load(file)
