"""jail: a small minijail-like sandbox library (namespaces, pivot_root, capabilities,
rlimits, fd hygiene, seccomp policies). It does not depend on sandvmm."""

from jail.errors import JailError, PolicyError
from jail.mounts import BindMount
from jail.policy import Clause, Comparison, Policy, Rule, load_policy, parse_policy
from jail.sandbox import JailConfig, JailedProcess, close_fds_except, spawn
from jail.seccomp import (
    SeccompListener,
    Violation,
    compile_filter,
    compile_program,
    receive_violation,
    respond,
)

__all__ = [
    "BindMount", "Clause", "close_fds_except", "Comparison", "JailConfig", "JailError", "JailedProcess",
    "Policy", "PolicyError", "Rule", "SeccompListener", "Violation", "compile_filter",
    "compile_program", "load_policy", "parse_policy", "receive_violation", "respond", "spawn",
]
