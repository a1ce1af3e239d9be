"""The typed seams hold: the object a user holds satisfies the protocols the layers take.

Checked by mypy (structural typing is a static property), on a snippet that assigns a ``VM`` to each
protocol; a class that lacks a member must be refused, or the check proves nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent

CONFORMS = """
from aradia.linux.kernel import LinuxVM
from aradia.machine.handle import VMHandle
from aradia.vm import VM

def seams(vm: VM) -> None:
    handle: VMHandle = vm
    linux: LinuxVM = vm
"""

LACKS_CPUS = """
from aradia.machine.handle import VMHandle
from aradia.vm import VM

class NoCpus:
    def __init__(self, vm: VM) -> None:
        self.memory = vm.memory
        self.machine = vm.machine
        self.translator = vm.translator
    def stamp(self) -> object | None: return None

def seams(vm: VM) -> None:
    handle: VMHandle = NoCpus(vm)
"""


def mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Run mypy on ``source`` against the package (imports followed silently, not checked)."""
    path = tmp_path / "seams.py"
    path.write_text(source)
    return subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                           "--cache-dir", str(ROOT / ".mypy_cache"), str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=170)


def test_vm_satisfies_the_handle_and_linux_protocols(tmp_path: Path) -> None:
    result = mypy(tmp_path, CONFORMS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_a_class_without_cpus_is_not_a_handle(tmp_path: Path) -> None:
    result = mypy(tmp_path, LACKS_CPUS)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Incompatible types in assignment (expression has type "NoCpus", variable has type "VMHandle")' \
        in result.stdout
