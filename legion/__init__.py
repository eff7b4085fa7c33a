"""LEGION: learning to ground and explain for synthetic image detection."""

__version__ = "0.1.0"
