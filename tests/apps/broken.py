"""An app module that fails while being imported."""

raise RuntimeError("broken on purpose")
