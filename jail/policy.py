"""The seccomp policy text format (in crosvm's style) and its in-memory form.

Parsing here is pure: it reads the policy files and nothing else. Whether a syscall
name exists on x86_64 is checked when the policy is compiled (jail.seccomp), because
only libseccomp knows the syscall table.

    # comment
    @include common_device.policy          # relative to this file's directory
    read: 1                                # allowed unconditionally
    getrandom: return EPERM                # fails with EPERM, not a violation
    fcntl: arg1 == F_GETFL || arg1 == F_SETFL
    mmap: arg2 in PROT_READ|PROT_WRITE && arg3 == MAP_SHARED || arg3 == MAP_PRIVATE|MAP_ANONYMOUS

`&&` binds tighter than `||`. Operators compare one 64-bit argument `arg0`..`arg5` with
a constant: == != < <= > >= (unsigned), `& M` (some bit of M is set) and `in M` (no bit
outside M is set).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jail.errors import PolicyError
from jail.policy_constants import ERRNO_NUMBERS, POLICY_CONSTANTS

ARG_COUNT = 6
U64_MASK = (1 << 64) - 1
MAX_ERRNO = 4095
OPERATORS = ("==", "!=", "<", "<=", ">", ">=", "&", "in")

_SYSCALL_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<op>\|\||&&|==|!=|<=|>=|<|>|&|\|)"
    r"|(?P<number>0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[0-7]*|[1-9][0-9]*)(?![A-Za-z0-9_])"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*)"
    r")"
)


@dataclass(frozen=True)
class Comparison:
    """`argN OP value`: one test of one syscall argument."""

    arg: int
    op: str
    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.arg < ARG_COUNT:
            raise ValueError(f"arg{self.arg}: syscalls have arg0..arg{ARG_COUNT - 1}")
        if self.op not in OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}")
        if not 0 <= self.value <= U64_MASK:
            raise ValueError(f"{self.value} does not fit in 64 bits")

    def holds(self, argument: int) -> bool:
        """The meaning of this comparison, for a 64-bit argument value."""
        a, v = argument & U64_MASK, self.value
        return {
            "==": a == v, "!=": a != v, "<": a < v, "<=": a <= v, ">": a > v, ">=": a >= v,
            "&": a & v != 0, "in": a & ~v & U64_MASK == 0,
        }[self.op]

    def __str__(self) -> str:
        return f"arg{self.arg} {self.op} {self.value:#x}"


@dataclass(frozen=True)
class Clause:
    """Comparisons joined by `&&`: the clause holds when every comparison holds."""

    comparisons: tuple[Comparison, ...]

    def holds(self, args: Sequence[int]) -> bool:
        return all(c.holds(args[c.arg]) for c in self.comparisons)

    def __str__(self) -> str:
        return " && ".join(map(str, self.comparisons))


@dataclass(frozen=True)
class Rule:
    """What the policy says about one syscall.

    `errno` set: the syscall fails with that errno. Otherwise it is allowed when any
    clause holds, or always when there are no clauses.
    """

    syscall: str
    clauses: tuple[Clause, ...] = ()
    errno: int | None = None
    origin: str = field(default="", compare=False)  # "path:line", for messages

    def allows(self, args: Sequence[int]) -> bool:
        if self.errno is not None:
            return False
        return not self.clauses or any(c.holds(args) for c in self.clauses)

    def __str__(self) -> str:
        if self.errno is not None:
            return f"{self.syscall}: return {errno.errorcode.get(self.errno, self.errno)}"
        if not self.clauses:
            return f"{self.syscall}: 1"
        return f"{self.syscall}: " + " || ".join(map(str, self.clauses))


@dataclass(frozen=True)
class Policy:
    """The rules of a policy file and of everything it includes, by syscall name."""

    rules: Mapping[str, Rule]
    path: str = field(default="<policy>", compare=False)

    def to_text(self) -> str:
        """Policy text that parses back into an equal Policy (includes are flattened)."""
        return "".join(f"{rule}\n" for rule in self.rules.values())


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Parse a policy file and the files it includes."""
    path = Path(path)
    parser = _Parser()
    parser.parse_file(path, included_from=None, include_stack=())
    return Policy(dict(parser.rules), str(path))


def parse_policy(text: str, path: str = "<policy>",
                 include_dir: str | os.PathLike[str] | None = None) -> Policy:
    """Parse policy text; `@include` resolves against include_dir (default: path's directory)."""
    parser = _Parser()
    base = Path(include_dir) if include_dir is not None else Path(path).parent
    parser.parse_text(text, path, base, include_stack=(os.path.abspath(path),))
    return Policy(dict(parser.rules), path)


def parse_constant(text: str) -> int:
    """`MAP_SHARED|0x20`-style constant expression (names from the policy table)."""
    tokens = _tokenize(text)
    if not tokens:
        raise ValueError("a constant is missing")
    value, rest = _parse_value(tokens)
    if rest:
        raise ValueError(f"unexpected {rest[0][1]!r} after the constant")
    return value


class _Parser:
    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}

    def parse_file(self, path: Path, included_from: str | None,
                   include_stack: tuple[str, ...]) -> None:
        key = os.path.abspath(path)
        if key in include_stack:
            chain = " -> ".join(os.path.basename(p) for p in include_stack + (key,))
            raise PolicyError(f"{included_from}: include cycle: {chain}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            where = f"{included_from}: cannot include" if included_from else "cannot read policy"
            raise PolicyError(f"{where} {path}: {reason}") from None
        self.parse_text(text, str(path), path.parent, include_stack + (key,))

    def parse_text(self, text: str, path: str, base: Path,
                   include_stack: tuple[str, ...]) -> None:
        for number, raw in enumerate(text.splitlines(), start=1):
            where = f"{path}:{number}"
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("@"):
                self._directive(line, where, base, include_stack)
                continue
            try:
                rule = _parse_rule(line, where)
            except ValueError as e:
                raise PolicyError(f"{where}: {e}") from None
            first = self.rules.get(rule.syscall)
            if first is not None:
                raise PolicyError(f"{where}: {rule.syscall} is listed twice "
                                  f"(first at {first.origin})")
            self.rules[rule.syscall] = rule

    def _directive(self, line: str, where: str, base: Path,
                   include_stack: tuple[str, ...]) -> None:
        directive, _, argument = line.partition(" ")
        if directive != "@include":
            raise PolicyError(f"{where}: unknown directive {directive} (only @include exists)")
        if not argument.strip():
            raise PolicyError(f"{where}: @include needs a file name")
        target = Path(os.path.normpath(base / argument.strip()))
        self.parse_file(target, where, include_stack)


def _parse_rule(line: str, where: str) -> Rule:
    name, colon, expression = line.partition(":")
    name, expression = name.strip(), expression.strip()
    if not colon:
        raise ValueError(f"expected 'syscall: expression', got {line!r}")
    if not _SYSCALL_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a syscall name")
    if not expression:
        raise ValueError(f"{name}: the expression after ':' is missing")
    if expression == "1":
        return Rule(name, origin=where)
    if re.fullmatch(r"[0-9]+", expression):
        raise ValueError(f"{name}: expected 1 (allow), 'return ERRNO' or 'argN OP constant', "
                         f"found {expression!r}")
    if expression.split(None, 1)[0] == "return":
        return Rule(name, errno=_parse_errno(expression[len("return"):].strip()), origin=where)
    return Rule(name, clauses=_parse_clauses(_tokenize(expression)), origin=where)


def _parse_errno(text: str) -> int:
    if not text:
        raise ValueError("'return' needs an errno, e.g. 'return EPERM'")
    if text in ERRNO_NUMBERS:
        return ERRNO_NUMBERS[text]
    try:
        number = parse_constant(text)
    except ValueError:
        raise ValueError(f"unknown errno {text!r}") from None
    if number > MAX_ERRNO:
        raise ValueError(f"errno {number} is above {MAX_ERRNO}")
    return number


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            if text[position:].strip() == "":
                break
            raise ValueError(f"unexpected {text[position:].strip()[:20]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def _parse_clauses(tokens: list[tuple[str, str]]) -> tuple[Clause, ...]:
    clauses, comparisons = [], []
    while True:
        comparison, tokens = _parse_comparison(tokens)
        comparisons.append(comparison)
        if not tokens:
            clauses.append(Clause(tuple(comparisons)))
            return tuple(clauses)
        joiner, tokens = tokens[0][1], tokens[1:]
        if joiner == "||":
            clauses.append(Clause(tuple(comparisons)))
            comparisons = []
        elif joiner != "&&":
            raise ValueError(f"expected && or || but found {joiner!r}")


def _parse_comparison(tokens: list[tuple[str, str]]) -> tuple[Comparison, list]:
    if len(tokens) < 3:
        got = " ".join(t for _, t in tokens) or "nothing"
        raise ValueError(f"expected 'argN OP constant' but found {got!r}")
    (_, arg), (_, op) = tokens[0], tokens[1]
    match = re.fullmatch(r"arg([0-9]+)", arg)
    if match is None:
        raise ValueError(f"expected arg0..arg{ARG_COUNT - 1} but found {arg!r}")
    index = int(match.group(1))
    if index >= ARG_COUNT:
        raise ValueError(f"{arg}: syscalls have arg0..arg{ARG_COUNT - 1}")
    if op not in OPERATORS:
        raise ValueError(f"expected an operator ({' '.join(OPERATORS)}) after {arg}, "
                         f"found {op!r}")
    value, rest = _parse_value(tokens[2:])
    if op == "&" and value == 0:
        raise ValueError(f"'{arg} & 0' can never hold")
    return Comparison(index, op, value), rest


def _parse_value(tokens: list[tuple[str, str]]) -> tuple[int, list]:
    """NAME|NUMBER ('|' NAME|NUMBER)*  — stops at anything else."""
    value = 0
    while True:
        if not tokens:
            raise ValueError("a constant is missing at the end")
        kind, text = tokens[0]
        if kind == "number":
            value |= int(text, 8) if re.fullmatch(r"0[0-7]+", text) else int(text, 0)
        elif kind == "word" and text in POLICY_CONSTANTS:
            value |= POLICY_CONSTANTS[text]
        elif kind == "word":
            raise ValueError(f"unknown constant {text!r}")
        else:
            raise ValueError(f"expected a constant but found {text!r}")
        if value > U64_MASK:
            raise ValueError(f"{text} does not fit in 64 bits")
        tokens = tokens[1:]
        if not tokens or tokens[0] != ("op", "|"):
            return value, tokens
        tokens = tokens[1:]

