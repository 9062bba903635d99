"""``python -m nemo_opd <subcommand> ...``: the same as the ``nemo_opd`` command."""

import sys

from nemo_opd.cli import main

sys.exit(main())
