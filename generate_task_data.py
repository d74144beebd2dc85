#!/usr/bin/env python
"""Write an lm-eval task's requests as lines (the paper's step 1). `python generate_task_data.py --help` lists the flags."""

import sys

from h2o.serve.lm_eval.paper import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
