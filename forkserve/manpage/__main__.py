"""`python -m forkserve.manpage [--check] [DIR]`: see forkserve.manpage.main."""

from forkserve.manpage import main

raise SystemExit(main())
