"""`python -m blockpress.runtime.cli` is the `blockpress` command."""

import sys

from blockpress.runtime.cli.main import main

sys.exit(main())
