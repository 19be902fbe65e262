"""``python -m authnotify``: the same as the ``authnotify`` command."""

import sys

from authnotify.cli.main import main

sys.exit(main())
