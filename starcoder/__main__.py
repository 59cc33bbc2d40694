import sys

from starcoder.cli import main

# A guard: datatrove's local executor starts workers with forkserver, which imports __main__.
if __name__ == "__main__":
    sys.exit(main())
