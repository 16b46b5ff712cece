"""The exceptions of the jail package; every message is one line meant for a human."""


class JailError(Exception):
    """A jailed child could not be started, or a jail setting is invalid."""


class PolicyError(JailError):
    """A seccomp policy file is invalid. The message reads `path:line: what is wrong`."""
