"""The two ways a step fails on purpose (anything else is a crash: exit 1, retried by orchestrators)."""

EXIT_BAD_INPUT = 2  # never retried: the same input fails the same way
EXIT_GATE_FAILED = 3  # a quality, parity or latency gate said no: not retried, shown as a gate failure
EXIT_PREEMPTED = 143  # SIGTERM: a checkpoint was saved, retried (resumes); 128 + 15, as a process SIGTERM killed


class EupeError(Exception):
    """A user-facing failure: the message is one line naming the file, field or value at fault."""

    exit_code = EXIT_BAD_INPUT


class GateFailed(EupeError):
    """A model that was measured and found wanting (quality, export parity, latency); outputs are written."""

    exit_code = EXIT_GATE_FAILED


class Preempted(EupeError):
    """Training stopped on SIGTERM after saving a checkpoint; a retry with ``--resume`` continues from it."""

    exit_code = EXIT_PREEMPTED
