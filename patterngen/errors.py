"""One error family for patterngen: every message says what is wrong, the rule, and the values."""


class PatternError(ValueError):
    """A pattern, grid or size that breaks a rule of patterngen (the base of all its errors)."""


class BackendUnavailable(PatternError):
    """No backend can run this pattern on these inputs; the message gives each one's reasons."""


class UnknownBackend(PatternError):
    """A backend name that no registry entry has; the message lists the valid names."""
