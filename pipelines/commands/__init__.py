"""The operator's commands beyond `run`: `status`, `doctor`, `demo`, and `sends` (preview, resend,
traits recompute). Each composes the steps through their public packages; `cli.py` calls them.
"""
