"""The tests mirror the package (tests/constraints, data, models, run, commands, api; tests/distributed for the
sharding layer's multi-process checks; launch; bench). Shared helpers (launch_helpers, reference_impl,
slurm_cluster, independent_bound, and test modules other tests import) are imported by their module name from any
folder: every test folder is on the path."""

import os
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for folder in [_TESTS, *sorted(p for p in _TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))]:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# Under pytest-xdist (pyproject's addopts: 2 workers on CI's 2 cores) each worker's in-process training gets one
# intra-op thread, as every launched process does: two workers with torch's default (a thread per core) would
# oversubscribe the cores, and OpenMP threads spin while they wait. Set before any test module imports torch.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
