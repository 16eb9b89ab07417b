"""``python -m llmc`` (and ``torchrun -m llmc oneshot ...``): the ``llmc`` command line."""

import sys

from llmc.cli import main

sys.exit(main())
