"""Small fd helpers shared by main and the device children."""

from __future__ import annotations

import os
from typing import Callable


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """A sink writing everything it is given to fd (a short write is continued, not dropped)."""
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write
