import signal
import sys

if "run" in sys.argv[1:]:
    # `systemctl reload` soon after the start would kill the daemon (SIGHUP's default) while it imports, before its
    # own handler is installed: until then a reload has nothing to reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from inspectd.cli import main  # noqa: E402 (after the signal: the import itself takes a third of a second)

sys.exit(main())
