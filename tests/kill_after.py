"""Test helper: ``proxyclip-eval`` with a fault injected (for the resume tests).

    python tests/kill_after.py N dataset=... ...     (also as a torchrun script)

Each process SIGKILLs itself once it has counted N images, in the middle of the next one (after its
decode, before it is counted and saved). The production loop only offers the ``before_count`` hook.
"""

import os
import signal
import sys

from proxyclip.evaluation import api


def main() -> None:
    after = int(sys.argv.pop(1))
    run_grid = api.run_grid

    def kill(counted: int) -> None:
        if counted >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    api.run_grid = lambda *args, **kwargs: run_grid(*args, before_count=kill, **kwargs)
    from proxyclip.cli.evaluate import main as evaluate_main

    evaluate_main()


if __name__ == "__main__":
    main()
