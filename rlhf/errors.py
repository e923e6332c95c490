"""The one exception type that means "the user's input is wrong" (exit code 2)."""


class BadInput(Exception):
    """A recipe, data file, argument or request is invalid.

    The message is one line that names the file, line or key and what was
    expected. The CLI prints it without a traceback and exits with code 2.
    """


class RunFailed(Exception):
    """A run cannot go on for a reason the user should read, not a bug (e.g.
    training diverged: too many steps skipped for non-finite values). The CLI
    prints the one-line message without a traceback and exits with code 1."""


class Paused(Exception):
    """A run stopped on purpose to wait for something outside it (e.g. a
    round's labels from people, with ``wait: false``). The CLI prints the
    one-line status and exits 0; the same ``rlhf run`` continues later."""
