"""Run an `inspectd` command under cProfile in every thread, writing one merged pstats file.

`python -m cProfile -o OUT -m inspectd run ...` profiles only the main thread, which in the daemon just waits for
signals: the work happens on the ingest, inference and publish threads. This launcher installs a profiler in each
thread as it starts (threading.setprofile) and merges them all when the command returns. The profilers time with
each thread's own CPU clock, so threads blocked on a lock, a poll or a queue show the CPU they use, not the wait.
The main thread is left out: it imports, loads the model, then only waits for signals, and none of that is the hot
path.

    python -m inspectd.tools.bench.profiling OUT.pstats run --config inspectd.yaml
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m inspectd.tools.bench.profiling OUT.pstats COMMAND [ARGS...]", file=sys.stderr)
        return 2
    out, command = argv[0], argv[1:]
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_in_thread(*_):
        # Called once as each new thread starts: hand the thread over to its own C-level profiler.
        profiler = cProfile.Profile(time.thread_time)
        with lock:
            profilers.append(profiler)
        sys.setprofile(None)
        profiler.enable()

    threading.setprofile(start_in_thread)
    try:
        from inspectd.cli import main as cli_main

        code = cli_main(command)
    finally:
        threading.setprofile(None)
        stats = None
        with lock:
            for profiler in profilers:
                profiler.disable()  # stops only this thread's hook; a finished thread's data is complete
                try:
                    if stats is None:
                        stats = pstats.Stats(profiler)
                    else:
                        stats.add(profiler)
                except TypeError:  # a thread that never made a call has no stats yet
                    pass
        if stats is not None:
            stats.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
