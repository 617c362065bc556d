"""Evaluation tasks behind `eval.py`; each returns a JSON-able dict whose last form eval.py prints."""
