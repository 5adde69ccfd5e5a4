"""Problem definition, result type, registry and checkpoint plumbing."""
