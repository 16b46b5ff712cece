"""The policy text format: operators, constants, includes, and one-line errors."""

from __future__ import annotations

import errno
import mmap
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jail.errors import PolicyError
from jail.policy import (
    OPERATORS,
    U64_MASK,
    Clause,
    Comparison,
    Policy,
    Rule,
    load_policy,
    parse_constant,
    parse_policy,
)
from jail.policy_constants import _FROM_KERNEL_HEADERS, POLICY_CONSTANTS


def only_rule(text: str) -> Rule:
    (rule,) = parse_policy(text).rules.values()
    return rule


@pytest.mark.parametrize("op", OPERATORS)
def test_every_operator_parses_to_its_comparison(op):
    rule = only_rule(f"fcntl: arg1 {op} 3")
    assert rule.clauses == (Clause((Comparison(1, op, 3),)),)


def test_and_binds_tighter_than_or():
    rule = only_rule("mmap: arg2 in PROT_READ|PROT_WRITE && arg3 == MAP_SHARED"
                     " || arg3 == MAP_PRIVATE|MAP_ANONYMOUS")
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    assert rule.clauses == (
        Clause((Comparison(2, "in", prot), Comparison(3, "==", mmap.MAP_SHARED))),
        Clause((Comparison(3, "==", mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),)),
    )


def test_unconditional_allow_and_return_errno():
    policy = parse_policy("read: 1\ngetrandom: return EPERM\nuname: return 38\n"
                          "sched_yield: return EWOULDBLOCK\n")
    assert policy.rules["read"] == Rule("read")
    assert policy.rules["getrandom"].errno == errno.EPERM
    assert policy.rules["uname"].errno == errno.ENOSYS
    assert policy.rules["sched_yield"].errno == errno.EAGAIN  # aliases are known too
    assert policy.rules["read"].allows([0] * 6)
    assert not policy.rules["getrandom"].allows([0] * 6)


@pytest.mark.parametrize("text, value", [
    ("10", 10), ("0x1f", 31), ("0X1F", 31), ("017", 15), ("0o17", 15), ("0", 0),
    ("MAP_SHARED|MAP_ANONYMOUS", mmap.MAP_SHARED | mmap.MAP_ANONYMOUS),
    ("FUTEX_WAIT_PRIVATE", 128), ("FUTEX_WAKE | FUTEX_PRIVATE_FLAG", 129),
    ("O_RDWR|0x80000", os.O_RDWR | 0x80000), ("0xffffffffffffffff", U64_MASK),
])
def test_constants(text, value):
    assert parse_constant(text) == value


def test_comments_and_blank_lines_are_ignored():
    policy = parse_policy("# whole line\n\n   \nread: 1  # trailing\n  write: 1#x\n")
    assert list(policy.rules) == ["read", "write"]


@pytest.mark.parametrize("text, message", [
    ("read", "expected 'syscall: expression'"),
    ("read:", "expression after ':' is missing"),
    ("read: 2", "expected 1 (allow), 'return ERRNO' or 'argN OP constant'"),
    ("Read: 1", "'Read' is not a syscall name"),
    ("read: arg6 == 1", "arg6: syscalls have arg0..arg5"),
    ("read: arg0 == NO_SUCH_THING", "unknown constant 'NO_SUCH_THING'"),
    ("read: arg0 == 1 |", "a constant is missing"),
    ("read: arg0 =< 1", "unexpected '=< 1'"),
    ("read: arg0 == 1 arg1 == 2", "expected && or || but found 'arg1'"),
    ("read: arg0 == 1 &&", "expected 'argN OP constant'"),
    ("read: arg0 & 0", "can never hold"),
    ("read: arg0 == 0x10000000000000000", "does not fit in 64 bits"),
    ("read: return", "'return' needs an errno"),
    ("read: return ENOTANERRNO", "unknown errno 'ENOTANERRNO'"),
    ("read: return 4096", "above 4095"),
    ("@import x.policy", "unknown directive @import"),
    ("@include", "@include needs a file name"),
    ("read: 1\nwrite: 1\nread: arg0 == 3", "read is listed twice (first at bad.policy:2)"),
])
def test_errors_are_one_line_with_path_and_line(text, message):
    with pytest.raises(PolicyError) as caught:
        parse_policy("# comment\n" + text, "bad.policy")
    text_of_error = str(caught.value)
    assert "\n" not in text_of_error
    assert re.match(r"bad\.policy:\d+: ", text_of_error), text_of_error
    assert message in text_of_error
    bad_line = len(("# comment\n" + text).splitlines())
    assert text_of_error.startswith(f"bad.policy:{bad_line}: ")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_includes_resolve_relative_to_the_including_file(tmp_path):
    write(tmp_path / "top.policy", "@include sub/middle.policy\nread: 1\n")
    write(tmp_path / "sub/middle.policy", "@include ../shared/base.policy  # comment\nwrite: 1\n")
    write(tmp_path / "shared/base.policy", "close: 1\n")
    policy = load_policy(tmp_path / "top.policy")
    assert set(policy.rules) == {"read", "write", "close"}
    assert policy.rules["close"].origin == f"{tmp_path}/shared/base.policy:1"


def test_include_cycle_is_an_error_naming_the_chain(tmp_path):
    write(tmp_path / "a.policy", "read: 1\n@include b.policy\n")
    write(tmp_path / "b.policy", "@include a.policy\n")
    with pytest.raises(PolicyError, match=r"b\.policy:1: include cycle: "
                                          r"a\.policy -> b\.policy -> a\.policy$"):
        load_policy(tmp_path / "a.policy")


def test_a_file_including_itself_is_a_cycle(tmp_path):
    write(tmp_path / "self.policy", "@include self.policy\n")
    with pytest.raises(PolicyError, match=r"self\.policy:1: include cycle"):
        load_policy(tmp_path / "self.policy")


def test_missing_include_names_the_including_line(tmp_path):
    write(tmp_path / "a.policy", "read: 1\n\n@include nowhere.policy\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "a.policy")
    assert str(caught.value) == (f"{tmp_path}/a.policy:3: cannot include "
                                 f"{tmp_path}/nowhere.policy: No such file or directory")


def test_duplicate_across_an_include_names_both_places(tmp_path):
    write(tmp_path / "base.policy", "read: 1\n")
    write(tmp_path / "dev.policy", "@include base.policy\nread: arg0 == 0\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "dev.policy")
    assert str(caught.value) == (f"{tmp_path}/dev.policy:2: read is listed twice "
                                 f"(first at {tmp_path}/base.policy:1)")


def test_including_one_file_twice_is_a_duplicate_not_a_cycle(tmp_path):
    write(tmp_path / "base.policy", "read: 1\n")
    write(tmp_path / "dev.policy", "@include base.policy\n@include base.policy\n")
    with pytest.raises(PolicyError, match="read is listed twice"):
        load_policy(tmp_path / "dev.policy")


def test_missing_top_level_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy .*none.policy: No such file"):
        load_policy(tmp_path / "none.policy")


@pytest.mark.parametrize("op, value, argument, expected", [
    ("&", 0b0110, 0b0100, True), ("&", 0b0110, 0b1001, False),
    ("in", 0b0110, 0b0100, True), ("in", 0b0110, 0b0000, True), ("in", 0b0110, 0b1100, False),
    ("<", 5, 4, True), ("<", 5, 5, False), (">=", 5, 5, True), ("!=", 5, 5, False),
    ("<", 5, -1, False),  # arguments are unsigned 64-bit: -1 is 2**64-1
])
def test_comparison_meaning(op, value, argument, expected):
    assert Comparison(0, op, value).holds(argument) is expected


# --- round trips ---------------------------------------------------------------------

SYSCALLS = ["read", "write", "mmap", "fcntl", "ioctl", "futex", "sendmsg", "close"]
values = st.one_of(st.sampled_from(sorted(set(POLICY_CONSTANTS.values()))),
                   st.integers(0, U64_MASK))
comparisons = st.builds(Comparison, st.integers(0, 5), st.sampled_from(OPERATORS),
                        values).filter(lambda c: not (c.op == "&" and c.value == 0))
clauses = st.builds(Clause, st.lists(comparisons, min_size=1, max_size=4).map(tuple))
rules = st.one_of(
    st.builds(Rule, st.sampled_from(SYSCALLS)),
    st.builds(Rule, st.sampled_from(SYSCALLS), errno=st.integers(0, 4095)),
    st.builds(Rule, st.sampled_from(SYSCALLS), st.lists(clauses, min_size=1, max_size=3).map(tuple)),
)
policies = st.lists(rules, max_size=6, unique_by=lambda r: r.syscall).map(
    lambda rs: Policy({r.syscall: r for r in rs}))


@given(policies)
@settings(max_examples=200)
def test_to_text_parses_back_to_the_same_policy(policy):
    assert parse_policy(policy.to_text()) == policy


@given(st.lists(st.sampled_from(sorted(POLICY_CONSTANTS)), min_size=1, max_size=5), st.data())
def test_names_joined_with_bars_are_or_ed(names, data):
    spaced = data.draw(st.sampled_from(["|", " | ", "| "]))
    expected = 0
    for name in names:
        expected |= POLICY_CONSTANTS[name]
    assert parse_constant(spaced.join(names)) == expected


@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_fails_with_a_policy_error(text):
    try:
        parse_policy(text, "fuzz.policy")
    except PolicyError as e:
        assert str(e).startswith("fuzz.policy:") and "\n" not in str(e)


# --- constants that come from kernel headers agree with the installed headers --------

HEADERS = ["linux/futex.h", "linux/eventpoll.h", "asm-generic/mman-common.h",
           "asm-generic/mman.h", "linux/mman.h", "linux/fcntl.h", "linux/prctl.h"]


def header_defines() -> dict[str, int]:
    found = {}
    for header in HEADERS:
        path = Path("/usr/include") / header
        if path.exists():
            for name, value in re.findall(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b",
                                          path.read_text(), re.MULTILINE):
                found.setdefault(name, int(value, 0))
    return found


def test_header_constants_match_the_installed_kernel_headers():
    defines = header_defines()
    if not defines:
        pytest.skip("no kernel headers under /usr/include")
    checked = {name: value for name, value in _FROM_KERNEL_HEADERS.items() if name in defines}
    assert len(checked) >= 20  # most are plain #defines; the _PRIVATE ones are expressions
    assert checked == {name: defines[name] for name in checked}
