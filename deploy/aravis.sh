#!/bin/sh
# Aravis for the genicam camera source (docs/CAMERAS.md), idempotent: Debian's Aravis library, its GObject
# introspection data and PyGObject, then `gi` made importable from a virtualenv.
#
#   deploy/aravis.sh VENV              a station: gir1.2-aravis-0.8 and python3-gi
#   deploy/aravis.sh VENV --fake       also aravis-tools, whose arv-fake-gv-camera-0.8 the tests use as a camera
#   deploy/aravis.sh --missing [--fake]
#                                      prints those of the packages that are not installed, on one line, and
#                                      changes nothing (`make test` names them with its other missing packages)
#
# PyGObject is not on the venv's path: a plain virtualenv does not see Debian's dist-packages, and PyPI's PyGObject
# builds from source against libgirepository. Debian's is linked in instead, and only its `gi` package (a .pth file
# naming a folder that holds one symlink), so nothing else of the system's Python leaks into the venv. That works
# when the venv's Python has the same minor version as Debian's python3 (the extension module is built for it);
# otherwise a PyGObject the venv already has is used, and without one this says what to do and exits 1.
# Not root, or no apt, with packages missing: says which and exits 1. The genicam tests need all of it, and a run
# that skipped them is not a pass.
set -eu

USAGE="usage: deploy/aravis.sh VENV [--fake] | deploy/aravis.sh --missing [--fake]"
VENV=${1:?$USAGE}
PACKAGES="gir1.2-aravis-0.8 python3-gi"
case "${2:-}" in
    "") ;;
    --fake) PACKAGES="$PACKAGES aravis-tools" ;;
    *) echo "$USAGE" >&2; exit 2 ;;
esac

missing=""
for package in $PACKAGES; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing="$missing $package"
done
if [ "$VENV" = "--missing" ]; then
    echo "${missing# }"
    exit 0
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null; }
    else
        echo "aravis.sh: missing Debian packages:$missing; run it as root, or apt-get install$missing" >&2
        exit 1
    fi
fi

IMPORT_ARAVIS='import gi; gi.require_version("Aravis", "0.8"); from gi.repository import Aravis'
SYSTEM_GI=$(/usr/bin/python3 -c 'import gi, os; print(os.path.dirname(gi.__file__))')
system_version=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$system_version" != "$venv_version" ]; then
    # A PyGObject of the venv's own (pip install PyGObject) is as good as Debian's.
    "$VENV/bin/python" -c "$IMPORT_ARAVIS" 2>/dev/null && exit 0
    echo "aravis.sh: Debian's PyGObject is for Python $system_version, $VENV has Python $venv_version: make the venv" \
        "with Debian's python3 (make clean && make test PYTHON=/usr/bin/python3), or pip install PyGObject into it" \
        "(needs libgirepository1.0-dev, libcairo2-dev, pkg-config) and run this again" >&2
    exit 1
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$VENV/system-gi"
ln -sfn "$SYSTEM_GI" "$VENV/system-gi/gi"
echo "$(cd "$VENV" && pwd)/system-gi" > "$site/system-gi.pth"
"$VENV/bin/python" -c "$IMPORT_ARAVIS" || { echo "aravis.sh: $VENV still cannot import Aravis through gi" >&2; exit 1; }
