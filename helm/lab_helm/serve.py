"""helm-server on one address only (default 127.0.0.1): helm-server itself always binds 0.0.0.0.

    python -m lab_helm.serve [--host 127.0.0.1] [helm-server arguments: --port, --suite, ...]
"""

from __future__ import annotations

import sys

from helm.benchmark import server


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    host = "127.0.0.1"
    if "--host" in argv:
        i = argv.index("--host")
        host = argv[i + 1]
        del argv[i : i + 2]
    run = server.app.run

    def run_on_host(**kwargs):
        kwargs["host"] = host
        print(f"(listening on {host} only)")
        return run(**kwargs)

    server.app.run = run_on_host
    sys.argv = ["helm-server", *argv]
    server.main()


if __name__ == "__main__":
    main()
