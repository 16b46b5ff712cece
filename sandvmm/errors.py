"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """A problem the user can fix: printed as `sandvmm: <message>` with no traceback.

    `hint` is an optional second sentence saying what to do; `status` is the exit code
    (2 for bad usage, 1 for everything else).
    """

    def __init__(self, message: str, hint: str = "", status: int = 1):
        super().__init__(message)
        self.hint = hint
        self.status = status

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}; {self.hint}" if self.hint else text
