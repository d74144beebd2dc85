#!/usr/bin/env python
"""Score lm-eval request lines with a full or small KV cache (the paper's step 2). `python run_lm_eval_harness.py --help` lists the flags."""

import sys

from h2o.serve.lm_eval.paper import run_main

if __name__ == "__main__":
    sys.exit(run_main())
