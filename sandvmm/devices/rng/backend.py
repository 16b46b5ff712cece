"""Where the entropy comes from: the host kernel's CSPRNG (getrandom needs no open file)."""

import os


def host_entropy(size: int) -> bytes:
    return os.getrandom(size)
