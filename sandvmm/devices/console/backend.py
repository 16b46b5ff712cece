"""The console's host side: the input it reads, with `stdin=true` (output goes through sandvmm.fdio.fd_writer)."""

from __future__ import annotations

import os

import trio

from sandvmm.devices.console.core import RECEIVE_QUEUE, ConsoleCore


def input_pump(fd: int, core: ConsoleCore):
    """A backend task feeding host input to the guest; stops at end of input."""
    async def pump(shell) -> None:
        pollable = True
        while True:
            if pollable:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except OSError:  # a regular file (stdin < file) cannot be polled: always readable
                    pollable = False
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not data:
                return
            while not _feed(shell, core, data):  # the guest is not reading: wait instead of dropping
                await trio.sleep(0.05)
            shell.process(RECEIVE_QUEUE)
    return pump


def _feed(shell, core: ConsoleCore, data: bytes) -> bool:
    with shell.lock:  # a kick thread of the shell may be serving the receive queue meanwhile
        return core.feed(data)
