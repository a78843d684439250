"""Model definitions and checkpoint/engine I/O."""
