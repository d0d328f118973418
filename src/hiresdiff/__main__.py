"""``python -m hiresdiff …`` runs the command line (also ``accelerate launch -m hiresdiff bench …``)."""

import sys

from hiresdiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
