"""E2Former-V2: equivariant transformer with on-the-fly equivariant attention."""

__version__ = "0.1.0"
