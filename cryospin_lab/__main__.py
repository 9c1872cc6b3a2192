"""``python -m cryospin_lab``: the ``cryospin-lab`` command line (:mod:`cryospin_lab.app.cli`)."""

import sys

from cryospin_lab.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
