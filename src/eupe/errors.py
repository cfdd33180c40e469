class EupeError(Exception):
    """A user-facing failure: the message is one line naming the file, field or value at fault."""
