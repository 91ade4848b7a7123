"""``python -m ctrlagent.cli``: the ``ctrlagent`` command."""

from ctrlagent.cli.main import main

raise SystemExit(main())
