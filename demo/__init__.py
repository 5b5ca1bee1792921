"""The demos, run from the repository's root: `make demo` (``python -m demo.replication``)
and `make demo-ha` (``python -m demo.ha``). Not part of the package: they drive the real
CLI through the test harness (tests/harness), which this puts on the path.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
