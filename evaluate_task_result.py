#!/usr/bin/env python
"""lm-eval's metrics from run_lm_eval_harness.py's results (the paper's step 3). `python evaluate_task_result.py --help` lists the flags."""

import sys

from h2o.serve.lm_eval.paper import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
