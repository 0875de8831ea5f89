#!/usr/bin/env python
"""Regenerate the shipped GFN2-xTB dataset (same as ``python -m e2f.data.make_shipped``).

Run it niced on shared machines: ``nice -n 10 python scripts/make_shipped_dataset.py``
(about 2-3 CPU minutes on one core; writes e2f/data/shipped/xtb_organic.{h5,aselmdb,json}).
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/tblite start OpenMP

from e2f.data.make_shipped import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
