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


def test_without_libseccomp_only_the_seccomp_parts_fail():
    """A host without libseccomp can still parse policies, close fds and run sandvmm unjailed."""
    code = ("import sys\n"
            "sys.modules['pyseccomp'] = None  # what a missing libseccomp looks like to an import\n"
            "import jail, sandvmm.main.run\n"
            "jail.parse_policy('read: 1\\n')\n"
            "assert callable(jail.close_fds_except)\n"
            "try:\n"
            "    jail.spawn\n"
            "except ImportError:\n"
            "    print('spawn needs pyseccomp')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "spawn needs pyseccomp"
