import sys

from starcoder.cli import main

sys.exit(main())
