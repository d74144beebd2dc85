"""Offline HELM evaluation of run_helm.py results: XSUM data, a results-file client, checks.

Importable when `helm/` (this package's parent folder) is on PYTHONPATH, as `our_run.sh` and
`export_requests.sh` arrange. The folder `helm/` itself has no `__init__.py` on purpose, so that
it never shadows the `helm` package of crfm-helm.
"""
