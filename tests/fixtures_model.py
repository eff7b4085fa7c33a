"""Model fixtures (tiny checkpoints). Owned by the model/builders work."""
