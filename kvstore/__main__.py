"""``python -m kvstore``: the ``kvstore`` command."""

from kvstore.tools.cli import main

raise SystemExit(main())
