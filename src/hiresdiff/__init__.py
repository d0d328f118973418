"""hiresdiff."""
