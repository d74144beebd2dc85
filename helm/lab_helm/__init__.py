"""Offline HELM evaluation of run_helm.py results: XSUM data, a results-file client, checks.

Installed with h2o by `make venv` (pyproject.toml maps it from helm/lab_helm). The folder `helm/`
itself has no `__init__.py` on purpose, so that it never shadows the `helm` package of crfm-helm.
"""
