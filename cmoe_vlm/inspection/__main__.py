import sys

from ..cli.inspect import main

sys.exit(main())
