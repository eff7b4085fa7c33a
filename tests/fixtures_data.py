"""Data fixtures (ToyScars, SynthScars sample). Owned by the data work."""
