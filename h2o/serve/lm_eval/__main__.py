"""`python -m h2o.serve.lm_eval`: lm-eval's command line with the lab's model and tasks."""

import sys

from h2o.serve.lm_eval.cli import main

sys.exit(main())
