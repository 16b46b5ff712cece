"""Block benchmark: fio in the guest on a virtio-blk disk, sandvmm against QEMU on the same image.

The guest image needs fio, built on the host first (the lab has no network):

    sandvmm image build --with fio
    sandvmm lab --cpus 2 -- python3 benchmarks/block_fio.py

(With one lab vCPU, the guest and both VMMs share one emulated CPU; two are closer to a
desktop, where a device child runs beside the vCPU. docs/devices/block.md has figures for both.)

Each job runs with sandvmm and with QEMU (q35, virtio-blk-pci, the same raw image file,
host page cache in both), `--rounds` times, the VMMs taking turns to go first. The table
gives each VMM's median MB/s and IOPS, the median of the rounds' ratios to QEMU and each
round's ratio: single lab runs swing by a third, so one round proves little. Inside the
lab only the ratios mean anything (docs/lab.md). `--checkout DIR` adds the sandvmm of
another source tree (say, the commit before a change) to every round: an A/B in one lab.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sandvmm.image.build import ensure_image
from sandvmm.lab.peer import PeerConfig, qemu_command

JOBS = {
    "4k randread QD32": "--rw=randread --bs=4k --iodepth=32",
    "4k randwrite QD32": "--rw=randwrite --bs=4k --iodepth=32",
    "1M seq read": "--rw=read --bs=1M --iodepth=4",
    "1M seq write": "--rw=write --bs=1M --iodepth=4",
}
# fio --minimal (terse v3): read bandwidth KiB/s and IOPS are fields 7 and 8, write 48 and 49.
READ_BW, READ_IOPS, WRITE_BW, WRITE_IOPS = 6, 7, 47, 48


def fio_script(options: str, seconds: int) -> str:
    return (f"fio --name=job --filename=/dev/vda --direct=1 --ioengine=libaio --time_based "
            f"--runtime={seconds} --size=256M {options} --minimal")


def parse(output: str) -> tuple[float, float] | None:
    """(MB/s, IOPS) of the one fio job in the console output."""
    for line in output.splitlines():
        fields = line.strip().split(";")
        if len(fields) > WRITE_IOPS and fields[0] == "3":
            read_bw, write_bw = float(fields[READ_BW]), float(fields[WRITE_BW])
            if read_bw >= write_bw:
                return read_bw * 1024 / 1e6, float(fields[READ_IOPS])
            return write_bw * 1024 / 1e6, float(fields[WRITE_IOPS])
    return None


def run_vmm(command: list[str], timeout: float, checkout: str | None = None) -> subprocess.CompletedProcess | None:
    """The finished VMM (console output in stdout), or None if it did not finish in time.

    checkout: a source tree to take sandvmm from instead of this one (`python3 -m` looks in
    the working directory first, so the VMM runs there)."""
    env = None if checkout is None else {**os.environ, "PYTHONPATH": checkout}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=checkout, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{command[0]} ...: no result within {timeout:.0f} s; where its threads were:", file=sys.stderr)
        print(*process_tree_threads(process.pid), sep="\n  ", file=sys.stderr, flush=True)
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        print("  its output ended with:", *stdout.splitlines()[-6:], *stderr.splitlines()[-6:], sep="\n  ",
              file=sys.stderr, flush=True)
        return None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def process_tree_threads(root: int) -> list[str]:
    """One line per thread of process `root` and its descendants (the jailed children are in
    sessions of their own): name, state, and where in the kernel it waits."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    tree, lines = [root], [""]
    for pid in tree:
        tree.extend(child for child, parent in parents.items() if parent == pid)
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                stack = " < ".join(line.split()[-1] for line in (task / "stack").read_text().splitlines()[:6])
                lines.append(f"{pid}/{task.name} {(task / 'comm').read_text().strip()} {state} {stack}")
        except (OSError, IndexError):  # gone meanwhile, or no stack to read (not root)
            continue
    return lines


def fio_result(command: list[str], timeout: float, checkout: str | None = None) -> tuple[float, float] | None:
    """(MB/s, IOPS), or None, with the end of the VMM's output shown (a guest or VMM that died)."""
    finished = run_vmm(command, timeout, checkout)
    if finished is None:
        return None
    result = parse(finished.stdout)
    if result is None:
        print(f"no fio result (exit status {finished.returncode}); the output ended with:",
              *finished.stdout.splitlines()[-6:], *finished.stderr.splitlines()[-6:], sep="\n  ", file=sys.stderr)
    return result


def sandvmm_command(kernel: str, initrd: str, disk: str, script: str) -> list[str]:
    return [sys.executable, "-m", "sandvmm", "run", "--mem", "1024", "--kernel", kernel, "--initrd", initrd,
            "--block", disk, "--", "sh", "-c", script]


def qemu_disk_command(kernel: str, initrd: str, disk: str, script: str) -> list[str]:
    command = qemu_command(PeerConfig(["sh", "-c", script], machine="q35", mem_mib=1024), kernel, initrd)
    return command + ["-drive", f"file={disk},if=none,id=disk0,format=raw", "-device", "virtio-blk-pci,drive=disk0"]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="fio runtime per job")
    parser.add_argument("--rounds", type=int, default=3, help="runs per job and VMM; the medians are compared")
    parser.add_argument("--job", action="append", choices=list(JOBS), help="run only this job (repeatable)")
    parser.add_argument("--checkout", action="append", default=[], metavar="DIR",
                        help="also run the sandvmm in this source tree, beside this one (repeatable: an A/B "
                             "of a change in one lab session)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds a VMM gets per job before it counts as failed (a run takes about 1 min in the lab)")
    args = parser.parse_args()
    jobs = args.job or list(JOBS)
    # Each VMM: its command maker, and the source tree it runs from (None: this one).
    vmms = {"sandvmm": (sandvmm_command, None)}
    for checkout in args.checkout:
        if not os.path.isdir(os.path.join(checkout, "sandvmm")):
            parser.error(f"--checkout {checkout}: no sandvmm package there")
        checkout = os.path.abspath(checkout)
        vmms[f"sandvmm@{os.path.basename(checkout)}"] = (sandvmm_command, checkout)
    vmms["QEMU"] = (qemu_disk_command, None)
    image = ensure_image(["fio"])
    results = {name: {vmm: [] for vmm in vmms} for name in jobs}
    with tempfile.TemporaryDirectory() as directory:
        disk = os.path.join(directory, "disk.img")
        with open(disk, "wb") as file:
            file.truncate(512 << 20)
        # Written once so reads hit allocated blocks in both VMMs.
        subprocess.run(["dd", "if=/dev/urandom", f"of={disk}", "bs=1M", "count=300", "conv=notrunc"],
                       check=True, capture_output=True)

        def command_for(vmm: str, script: str) -> tuple[list[str], str | None]:
            make_command, checkout = vmms[vmm]
            return make_command(str(image.kernel), str(image.initrd), disk, script), checkout

        # One untimed boot each first: a VMM's first start reads its binaries and the guest
        # image from cold caches (over 9p in the lab), and QEMU's first 4 KiB run came out
        # at half its later speed.
        for vmm in vmms:
            command, checkout = command_for(vmm, "true")
            run_vmm(command, args.timeout, checkout)
        for round_number in range(args.rounds):
            # Each round starts with the next VMM, so that a drift in the lab's speed (it
            # has one) does not always favour the same one.
            shift = round_number % len(vmms)
            order = [*vmms][shift:] + [*vmms][:shift]
            for name in jobs:
                for vmm in order:
                    command, checkout = command_for(vmm, fio_script(JOBS[name], args.seconds))
                    result = fio_result(command, args.timeout, checkout)
                    print(f"round {round_number + 1}, {name}: {vmm} {result}", file=sys.stderr, flush=True)
                    results[name][vmm].append(result)
    print(f"\n{args.rounds} rounds of {args.seconds} s per job and VMM: medians; the ratio is the median of"
          " the rounds' ratios to QEMU (the runs of a round are next to each other in time, and the lab drifts)")
    print("\n| job | VMM | MB/s | IOPS | / QEMU | rounds |")
    print("|---|---|---|---|---|---|")
    for name in jobs:
        theirs = results[name]["QEMU"]
        for vmm, runs in results[name].items():
            # A failed run (None) leaves its round's ratio out, and its VMM's median.
            done = [run for run in runs if run is not None]
            if not done:
                print(f"| {name} | {vmm} | failed | | | |")
                continue
            ratios = [ours[0] / qemu[0] if ours and qemu else None for ours, qemu in zip(runs, theirs)]
            known = [ratio for ratio in ratios if ratio is not None]
            each = " ".join("-" if ratio is None else f"{ratio:.2f}" for ratio in ratios)
            ratio = "" if vmm == "QEMU" else f"{median(known):.2f}" if known else "-"
            print(f"| {name} | {vmm} | {median([r[0] for r in done]):.1f} | {median([r[1] for r in done]):.0f} |"
                  f" {ratio} | {'' if vmm == 'QEMU' else each} |")


if __name__ == "__main__":
    main()
