"""Checkpoint save/resume helpers and pure state-dict conversion."""
