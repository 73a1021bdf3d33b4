"""The hand-written `_core.pyi` matches the compiled extension."""

import subprocess
import sys


def test_core_stub_matches_the_extension():
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "mmrecipe._core"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
