"""`python -m klotski` is the `klotski` console script."""

from klotski.cli import main

raise SystemExit(main())
