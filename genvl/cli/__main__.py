import sys

from genvl.cli import main

sys.exit(main())
