"""Boot benchmark: sandvmm against QEMU (microvm and q35) on the same kernel and initramfs.

Run where /dev/kvm is hardware-speed, so on hosts without VT-x/AMD-V inside the lab:

    sandvmm lab -- python3 benchmarks/boot.py -n 5

Each round boots the default guest once with every VMM, in turn, running `cat /proc/uptime`.
sandvmm boots the image's decompressed vmlinux (as `sandvmm run` does by default); QEMU boots
the bzImage, as QEMU is normally run, and once more as microvm given that same vmlinux (PVH
entry), so the gain of not decompressing in the guest is shown apart.
It prints the median wall time from launching the VMM to the guest command's output
(init has run and loaded its modules) and to the VMM's exit, the guest's own uptime when the command runs (/proc/uptime), each figure's
ratio to QEMU microvm, and how many boots crashed and were retried. Inside the lab only the ratios mean anything (docs/lab.md).
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import threading
import time

from sandvmm.doctor import shmem_huge_pages
from sandvmm.image.build import ensure_image
from sandvmm.lab.peer import PeerConfig, qemu_command


def is_uptime(line: str) -> bool:
    words = line.split()
    return len(words) == 2 and all(word.replace(".", "", 1).isdigit() for word in words)


def timed_boot(command: list[str]) -> dict[str, float] | None:
    """Launch, note when the guest command's output (its /proc/uptime) arrives, wait for exit."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: dict[str, float] = {}
    captured = {"stdout": [], "stderr": []}

    def watch(name: str, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace")
            captured[name].append(line)
            if name == "stdout" and is_uptime(line) and "init" not in seen:
                seen["init"] = time.monotonic() - started

    threads = [threading.Thread(target=watch, args=(name, getattr(process, name))) for name in captured]
    for thread in threads:
        thread.start()
    process.wait()
    exited = time.monotonic() - started
    for thread in threads:
        thread.join()
    uptimes = [float(line.split()[0]) for line in captured["stdout"] if is_uptime(line)]
    if "init" not in seen or not uptimes:
        print(f"boot failed: {command[0]} ...: {''.join(captured['stdout'][-3:])}{''.join(captured['stderr'][-3:])}",
              file=sys.stderr)
        return None
    return {"init": seen["init"], "exit": exited, "guest": uptimes[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=5)
    parser.add_argument("--mem", type=int, default=512)
    args = parser.parse_args()
    # Timed as installed (byte-compiled), not as an editable checkout compiling at each start.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ("sandvmm", "jail"):
        compileall.compile_dir(os.path.join(root, package), quiet=1)
    image = ensure_image()
    guest_command = ["cat", "/proc/uptime"]
    vmms = {"sandvmm": [sys.executable, "-m", "sandvmm", "run", "--mem", str(args.mem), "--", *guest_command]}
    for name, machine, kernel in (("qemu-microvm", "microvm", image.kernel), ("qemu-q35", "q35", image.kernel),
                                  ("qemu-microvm-pvh", "microvm", image.vmlinux)):
        config = PeerConfig(command=guest_command, machine=machine, mem_mib=args.mem)
        vmms[name] = qemu_command(config, str(kernel), str(image.initrd))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in vmms}
    failures = {name: 0 for name in vmms}
    for round_number in range(args.rounds):
        for name, command in vmms.items():
            # A boot that crashes (nested guests in the lab sometimes do) is counted and retried.
            while (figures := timed_boot(command)) is None and failures[name] < 3 * args.rounds:
                failures[name] += 1
            if figures is None:
                raise SystemExit(f"{name}: too many failed boots")
            results[name].append(figures)
        print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    medians = {name: {key: statistics.median(run[key] for run in runs) for key in ("init", "exit", "guest")}
               for name, runs in results.items()}
    base = medians["qemu-microvm"]
    print(f"boot of the default guest, median of {args.rounds} rounds, {os.cpu_count()} host cpus,"
          f" shared-memory huge pages: {shmem_huge_pages()}"
          f"{' (inside the lab: compare ratios only)' if os.environ.get('SANDVMM_IN_LAB') else ''}")
    print(f"{'vmm':17} {'to cmd s':>10} {'to exit s':>10} {'guest s':>8} {'cmd/microvm':>13} {'exit/microvm':>13}"
          f" {'failed boots':>13}")
    for name, figures in medians.items():
        print(f"{name:17} {figures['init']:10.3f} {figures['exit']:10.3f} {figures['guest']:8.3f}"
              f" {figures['init'] / base['init']:13.2f} {figures['exit'] / base['exit']:13.2f} {failures[name]:13}")


if __name__ == "__main__":
    main()
