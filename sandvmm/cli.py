"""Command line: parses arguments into config objects and hands them to the code that runs them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sandvmm.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> None:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _package_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _serial_option(text: str) -> dict[str, str]:
    """crosvm's --serial key=value list: COM1 (hardware=serial) or a virtio-console port
    (hardware=virtio-console), each to stdout, a file, or nowhere."""
    options = dict(item.partition("=")[::2] for item in text.split(",") if item)
    kind = options.setdefault("type", "stdout")
    if kind not in ("stdout", "file", "sink"):
        raise argparse.ArgumentTypeError(f"type={kind} is not supported (stdout, file or sink)")
    if kind == "file" and not options.get("path"):
        raise argparse.ArgumentTypeError("type=file needs path=")
    hardware = options.setdefault("hardware", "serial")
    if hardware not in ("serial", "virtio-console") or options.get("num", "1") != "1":
        raise argparse.ArgumentTypeError("hardware must be serial or virtio-console, num=1")
    unknown = set(options) - {"type", "path", "hardware", "num", "stdin"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown --serial option {sorted(unknown)[0]}")
    if options.get("stdin", "false") not in ("true", "false"):
        raise argparse.ArgumentTypeError("stdin must be true or false")
    if options.get("stdin") == "true" and hardware == "serial":
        raise argparse.ArgumentTypeError("stdin=true is for hardware=virtio-console (COM1 reads stdin when no command is given)")
    return options


def _serials(options: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """The --serial options by hardware; each hardware at most once."""
    by_hardware: dict[str, dict[str, str]] = {}
    for option in options:
        if option["hardware"] in by_hardware:
            raise UserError(f"--serial hardware={option['hardware']} is given twice", status=2)
        by_hardware[option["hardware"]] = option
    return by_hardware


def _output_path(option: dict[str, str] | None) -> Path | None:
    """Where a serial port's output goes: None for stdout, else a file (/dev/null for sink)."""
    if option is None or option["type"] == "stdout":
        return None
    return Path("/dev/null") if option["type"] == "sink" else Path(option["path"])


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _block_option(text: str) -> dict:
    """crosvm's --block PATH[,ro][,root][,sparse=BOOL][,id=SERIAL][,direct=BOOL] (path= works too)."""
    items = [item for item in text.split(",") if item]
    options: dict = {"ro": False, "root": False, "sparse": True, "id": "", "direct": False}
    if items and "=" not in items[0] and items[0] not in ("ro", "root"):
        options["path"] = items.pop(0)
    for item in items:
        key, has_value, value = item.partition("=")
        if key in ("path", "id"):
            options[key] = value
        elif key in ("ro", "root", "sparse", "direct"):
            if has_value and value.lower() not in _TRUE + _FALSE:
                raise argparse.ArgumentTypeError(f"{key}={value}: give true or false")
            options[key] = not has_value or value.lower() in _TRUE
        else:
            raise argparse.ArgumentTypeError(f"unknown --block option {key}")
    if not options.get("path"):
        raise argparse.ArgumentTypeError("--block needs a path")
    if len(options["id"].encode()) > 20:
        raise argparse.ArgumentTypeError("id= is at most 20 bytes (virtio-blk's serial)")
    options["path"] = Path(options["path"])
    return options


def _size(text: str) -> int:
    """A size in bytes, with an optional K, M, G or T suffix (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("KMGTkmgt"), text[len(text.rstrip("KMGTkmgt")):].upper()
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"{text} is not a size (e.g. 10G, 512M, 1048576)")
    return int(number) * units[unit]


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    return command[1:] if command[:1] == ["--"] else command


def build_parser() -> Parser:
    parser = Parser(prog="sandvmm", description="A sandboxed, process-per-device KVM virtual machine monitor.")
    commands = parser.add_subparsers(dest="subcommand", required=True, parser_class=Parser)

    image = commands.add_parser("image", help="build and locate guest images made from Debian packages")
    image_commands = image.add_subparsers(dest="image_command", required=True, parser_class=Parser)
    build = image_commands.add_parser("build", help="build (or reuse) the default guest image")
    build.add_argument("--with", dest="extra", type=_package_list, default=[], metavar="PKG,...",
                       help="add Debian packages (and the libraries they need) to the guest")
    build.add_argument("--refresh", action="store_true", help="check the registry for newer package versions")
    path = image_commands.add_parser("path", help="print the path of one of the image's files")
    path.add_argument("file", choices=["kernel", "vmlinux", "initrd", "lab-initrd"])
    path.add_argument("--with", dest="extra", type=_package_list, default=[], metavar="PKG,...")

    run = commands.add_parser("run", help="boot a guest; with -- CMD, run CMD in the default guest and exit with its status")
    run.add_argument("--kernel", type=Path, help="bzImage to boot (default: the default guest's kernel)")
    run.add_argument("--initrd", type=Path, help="initramfs (default: the default guest's, when --kernel is not given)")
    run.add_argument("-p", "--params", default="", metavar="STR", help="extra kernel command line parameters")
    run.add_argument("-m", "--mem", type=int, default=512, metavar="MiB", help="guest memory (default 512)")
    run.add_argument("-c", "--cpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    run.add_argument("--serial", type=_serial_option, action="append", default=[],
                     metavar="type=stdout|file|sink[,path=P][,hardware=serial|virtio-console][,stdin=true]",
                     help="where the guest's COM1 or virtio console (hvc0) goes (crosvm's spelling); repeatable")
    run.add_argument("--block", type=_block_option, action="append", default=[],
                     metavar="PATH[,ro][,root][,sparse=BOOL][,id=SERIAL][,direct=BOOL]",
                     help="a virtio-blk disk (raw file, block device or qcow2); repeatable: vda, vdb, ...")
    run.add_argument("--no-rng", action="store_true", help="no virtio-rng device (it is there by default)")
    run.add_argument("--disable-sandbox", action="store_true",
                     help="run device children without namespaces or seccomp (debugging only; see docs/sandbox.md)")
    run.add_argument("--seccomp-log-failures", action="store_true",
                     help="log a device's forbidden system calls and let them run, instead of stopping the VM")
    run.add_argument("--seccomp-policy-dir", type=Path, default=None, metavar="DIR",
                     help="where the devices' .policy files are (default: the project's policies/x86_64)")
    run.add_argument("-s", "--socket", type=Path, metavar="PATH", help="control socket: `sandvmm stop PATH` stops the VM")
    run.add_argument("--kvm-device", default="/dev/kvm", metavar="PATH", help="the KVM device (default /dev/kvm)")
    run.add_argument("-v", "--verbose", action="store_true", help="log boot timing and the VM's end to stderr")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")

    create = commands.add_parser("create-qcow2", help="create a qcow2 image (crosvm's create_qcow2)")
    create.add_argument("--backing-file", metavar="B", help="the image reads through to B where it has no data")
    create.add_argument("path", type=Path, metavar="PATH")
    create.add_argument("size", type=_size, nargs="?", metavar="SIZE",
                        help="virtual size, e.g. 10G (default: the backing file's)")

    stop = commands.add_parser("stop", help="stop the VM listening on a control socket (sandvmm run --socket)")
    stop.add_argument("socket", type=Path, metavar="PATH")

    lab = commands.add_parser("lab", help="run a command inside the nested KVM lab")
    lab.add_argument("--mem", type=int, default=4096, metavar="MiB", help="lab memory (default 4096)")
    lab.add_argument("--cpus", type=int, default=None, metavar="N", help="lab vCPUs (default 1: see docs/lab.md)")
    lab.add_argument("--rw", type=Path, action="append", default=[], metavar="DIR",
                     help="share DIR read-write at the same path (the rest of the host is read-only)")
    lab.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    lab.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")

    peer = commands.add_parser("peer", help="boot the default guest with QEMU-KVM (the peer benchmarks compare against)")
    peer.add_argument("--machine", choices=["microvm", "q35"], default="microvm")
    peer.add_argument("--mem", type=int, default=512, metavar="MiB")
    peer.add_argument("--cpus", type=int, default=1, metavar="N")
    peer.add_argument("--with", dest="extra", type=_package_list, default=[], metavar="PKG,...")
    peer.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")

    commands.add_parser("doctor", help="say what this host has for running VMs, and what to do about what it lacks")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.subcommand == "image":
        from sandvmm.image.build import ensure_image, find_image

        if args.image_command == "build":
            image = ensure_image(args.extra, refresh=args.refresh)
            print(image.directory)
            return 0
        image = find_image(args.extra)
        if image is None:
            with_flag = f" --with {','.join(args.extra)}" if args.extra else ""
            raise UserError("no guest image has been built yet", hint=f"run `sandvmm image build{with_flag}`")
        print({"kernel": image.kernel, "vmlinux": image.vmlinux, "initrd": image.initrd,
               "lab-initrd": image.lab_initrd}[args.file])
        return 0
    if args.subcommand == "run":
        import logging

        from sandvmm.main.run import RunConfig, run as run_vm

        logging.basicConfig(format="sandvmm: %(message)s", level=logging.INFO if args.verbose else logging.WARNING)
        from sandvmm.main.devices import POLICY_DIR, SandboxOptions

        serials = _serials(args.serial)
        sandbox = SandboxOptions(enabled=not args.disable_sandbox, log_failures=args.seccomp_log_failures,
                                 policy_dir=args.seccomp_policy_dir or POLICY_DIR)
        return run_vm(RunConfig(kernel=args.kernel, initrd=args.initrd, params=args.params, mem_mib=args.mem,
                                cpus=args.cpus, command=_command(args),
                                serial_output=_output_path(serials.get("serial")),
                                virtio_console=("virtio-console" in serials),
                                virtio_console_output=_output_path(serials.get("virtio-console")),
                                virtio_console_stdin=serials.get("virtio-console", {}).get("stdin") == "true",
                                rng=not args.no_rng, sandbox=sandbox, blocks=args.block,
                                kvm_device=args.kvm_device, control_socket=args.socket))
    if args.subcommand == "create-qcow2":
        from sandvmm.main.block import create_qcow2_command

        create_qcow2_command(args.path, args.size, args.backing_file)
        return 0
    if args.subcommand == "stop":
        from sandvmm.main.control import stop_vm

        stop_vm(args.socket)
        return 0
    if args.subcommand == "lab":
        from sandvmm.lab.runner import LabConfig, run as run_lab

        config = LabConfig(command=_command(args), mem_mib=args.mem, rw_dirs=args.rw, timeout=args.timeout)
        if args.cpus is not None:
            config.cpus = args.cpus
        return run_lab(config)
    if args.subcommand == "peer":
        from sandvmm.lab.peer import PeerConfig, run as run_peer

        return run_peer(PeerConfig(command=_command(args), machine=args.machine, mem_mib=args.mem,
                                   cpus=args.cpus, extra=args.extra))
    if args.subcommand == "doctor":
        from sandvmm.doctor import report

        return report()
    raise AssertionError(args.subcommand)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        status = run(args)
    except UserError as error:
        print(f"sandvmm: {error}", file=sys.stderr)
        status = error.status
    except KeyboardInterrupt:
        status = 130
    if args.subcommand == "run":
        # The VM is gone, its children reaped, the terminal restored: tearing down the few
        # hundred modules a VM loads would only delay the exit (0.2 s under the lab's TCG).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
                pass
        os._exit(status)
    sys.exit(status)
