"""Our initramfs writer produces archives that GNU cpio reads back exactly."""

import io
import os
import re
import subprocess

from sandvmm.image.cpio import CpioWriter


def test_archive_round_trips_through_gnu_cpio(tmp_path):
    source = tmp_path / "tree"
    (source / "usr" / "bin").mkdir(parents=True)
    (source / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (source / "usr" / "bin" / "tool").chmod(0o755)
    (source / "usr" / "bin" / "alias").symlink_to("tool")
    (source / "usr" / "share" / "doc").mkdir(parents=True)
    (source / "usr" / "share" / "doc" / "README").write_text("skipped")

    buffer = io.BytesIO()
    writer = CpioWriter(buffer)
    writer.file("init", b"odd-length", 0o755)
    writer.char_device("dev/console", 5, 1)
    writer.tree(str(source), skip=("usr/share/doc",))
    writer.close()
    data = buffer.getvalue()
    assert len(data) % 4 == 0

    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=data, capture_output=True, check=True).stdout.decode()
    names = {line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()}
    assert {"init", "dev", "dev/console", "usr", "usr/bin", "usr/bin/tool", "usr/bin/alias"} <= names
    assert not any("doc" in name for name in names)
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw") and re.search(r"\b5,\s+1\b", console)

    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=data, cwd=out, check=True)
    assert (out / "init").read_bytes() == b"odd-length"
    assert os.access(out / "init", os.X_OK)
    assert (out / "usr" / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(out / "usr" / "bin" / "alias") == "tool"
