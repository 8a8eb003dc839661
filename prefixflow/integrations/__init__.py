"""prefixflow inside other tools: lm_eval.py, the lm-evaluation-harness model.

Each integration is an optional extra (`pip install 'prefixflow[eval]'`); nothing here is
imported unless it is used.
"""
