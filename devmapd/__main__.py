"""`python -m devmapd` runs the CLI."""
import sys

from devmapd.cli import main

sys.exit(main())
