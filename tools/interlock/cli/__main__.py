"""``python -m interlock.cli …``: how the dev stack starts each service and worker process."""

import sys

from interlock.cli import main

sys.exit(main())
