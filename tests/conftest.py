"""Suite-wide test environment.

The daemon refuses to run as root (inspectd.daemon.security.refuse_root). Test containers and CI runners often are root,
so daemons the tests start are allowed to be, explicitly, here and nowhere else; tests/test_security.py removes
the variable again to check the refusal itself.
"""

import os

from inspectd.daemon.security import ALLOW_ROOT_ENV

if os.geteuid() == 0:
    os.environ[ALLOW_ROOT_ENV] = "1"
