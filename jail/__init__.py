"""jail: a small minijail-like sandbox library (namespaces, pivot_root, capabilities,
rlimits, fd hygiene, seccomp policies). It does not depend on sandvmm.

Parts that need libseccomp (pyseccomp) load on first use, so that a program can use the
rest, or run unjailed, on a host without it.
"""

import importlib

from jail.errors import JailError, PolicyError
from jail.linux import close_fds_except
from jail.mounts import BindMount
from jail.policy import Clause, Comparison, Policy, Rule, load_policy, parse_policy

_LAZY = {
    "JailConfig": "jail.sandbox", "JailedProcess": "jail.sandbox", "spawn": "jail.sandbox",
    "start": "jail.sandbox", "StartingJail": "jail.sandbox",
    "SeccompListener": "jail.seccomp", "Violation": "jail.seccomp", "compile_filter": "jail.seccomp",
    "compile_program": "jail.seccomp", "receive_violation": "jail.seccomp", "respond": "jail.seccomp",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jail' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BindMount", "Clause", "close_fds_except", "Comparison", "JailConfig", "JailError", "JailedProcess",
    "Policy", "PolicyError", "Rule", "SeccompListener", "Violation", "compile_filter",
    "compile_program", "load_policy", "parse_policy", "receive_violation", "respond", "spawn",
    "start", "StartingJail",
]
