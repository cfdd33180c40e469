"""The two ways a step fails on purpose (anything else is a crash: exit 1, retried by orchestrators)."""

EXIT_BAD_INPUT = 2  # never retried: the same input fails the same way
EXIT_GATE_FAILED = 3  # a quality, parity or latency gate said no: not retried, shown as a gate failure


class EupeError(Exception):
    """A user-facing failure: the message is one line naming the file, field or value at fault."""

    exit_code = EXIT_BAD_INPUT


class GateFailed(EupeError):
    """A model that was measured and found wanting (quality, export parity, latency); outputs are written."""

    exit_code = EXIT_GATE_FAILED
