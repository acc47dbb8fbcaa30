"""`python -m forkserve` runs the command line."""

from forkserve.cli import main

raise SystemExit(main())
