"""Scoring retrieval: recall at 1/5/10 with MUGE's hit semantics in both directions, the MUGE server's
evaluator (schema checks, then mean recall), scoring one or both directions from prediction files,
and the prediction files themselves (written and parsed here only). Pure functions and file I/O.

May import: data (nothing else of engine).
"""
