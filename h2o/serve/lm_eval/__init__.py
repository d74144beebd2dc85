"""lm-eval-harness with the lab's KV caches: the `h2o-lab` model (`model.py`), the lab's task
configs over vendored data (`tasks.py`), the command that hands lm-eval's CLI its arguments
(`cli.py`), and the paper's three steps (`paper.py`: task data, scoring, evaluation)."""
