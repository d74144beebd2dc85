#!/usr/bin/env python
"""Build HELM's XSUM scenario data (xsum.pk) from data/xsum/xsum_test_500.jsonl.

    python scripts/data/build_xsum.py [--n N] [--output-path helm/benchmark_output]

Writes <output-path>/scenarios/summarization/data/xsum.pk, where HELM's summarization_xsum
scenario reads it instead of downloading it: {"train": [], "validation": [], "test": the first N
articles}. our_run.sh and the export stage do this themselves; this is for a helm-run of your own.
"""

from lab_helm.scenario_data import main

if __name__ == "__main__":
    raise SystemExit(main())
