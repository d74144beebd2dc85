#!/usr/bin/env python
"""Generate HELM results with a full or H2O KV cache. `python run_helm.py --help` lists the flags."""

import sys

from h2o.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
