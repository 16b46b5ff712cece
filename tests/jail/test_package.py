"""jail stands alone: importing it pulls in nothing of sandvmm."""

import subprocess
import sys

from tests.jail.conftest import REPO


def test_jail_imports_without_sandvmm():
    code = ("import sys, jail\n"
            "leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'sandvmm')\n"
            "print(leaked)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
