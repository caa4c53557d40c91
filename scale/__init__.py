"""Real-scale planning: what SALMONN teachers and smolt students need on a given GPU (`python -m scale estimate`)."""
