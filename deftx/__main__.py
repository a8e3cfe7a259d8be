import sys

from deftx.cli import main

sys.exit(main())
