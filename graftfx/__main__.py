import sys

from graftfx.cli import main

sys.exit(main())
