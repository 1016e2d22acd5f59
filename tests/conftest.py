"""The tests mirror the package (tests/constraints, data, models, run, commands, api; tests/distributed for the
sharding layer's multi-process checks; launch; bench). Shared helpers (launch_helpers, reference_impl,
slurm_cluster, independent_bound, and test modules other tests import) are imported by their module name from any
folder: every test folder is on the path."""

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for folder in [_TESTS, *sorted(p for p in _TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))]:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
