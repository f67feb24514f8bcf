"""``python -m vipllava_jax.cli ...`` is the ``vipllava-jax`` command."""
import sys

from . import main

sys.exit(main())
