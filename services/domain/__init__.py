"""Domain functions: take a session, never commit, raise DomainError subclasses."""
