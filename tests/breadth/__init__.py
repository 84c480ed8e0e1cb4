"""The breadth table and its runner (run.py)."""
