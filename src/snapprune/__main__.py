"""``python -m snapprune`` is the ``snapprune`` command."""

from .cli import main

raise SystemExit(main())
