"""saejax."""
