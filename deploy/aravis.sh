#!/bin/sh
# Aravis for the genicam camera source (docs/CAMERAS.md), idempotent: Debian's Aravis library, its GObject
# introspection data and PyGObject, then `gi` made importable from a virtualenv.
#
#   deploy/aravis.sh VENV              a station: gir1.2-aravis-0.8 and python3-gi
#   deploy/aravis.sh VENV --fake       also aravis-tools, whose arv-fake-gv-camera-0.8 the tests use as a camera
#
# PyGObject is not on the venv's path: a plain virtualenv does not see Debian's dist-packages, and PyPI's PyGObject
# builds from source against libgirepository. Debian's is linked in instead, and only its `gi` package (a .pth file
# naming a folder that holds one symlink), so nothing else of the system's Python leaks into the venv. That works
# when the venv's Python has the same minor version as Debian's python3 (the extension module is built for it);
# otherwise this says so and leaves the venv alone.
# Not root, or no apt: says what is missing and exits 0, so `make test` runs and the genicam tests skip with the
# reason.
set -eu

VENV=${1:?usage: deploy/aravis.sh VENV [--fake]}
PACKAGES="gir1.2-aravis-0.8 python3-gi"
[ "${2:-}" = "--fake" ] && PACKAGES="$PACKAGES aravis-tools"

missing=""
for package in $PACKAGES; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing="$missing $package"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null; }
    else
        echo "aravis.sh: missing Debian packages:$missing (apt install$missing); genicam cameras and tests need them" >&2
        exit 0
    fi
fi

SYSTEM_GI=$(/usr/bin/python3 -c 'import gi, os; print(os.path.dirname(gi.__file__))')
system_version=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$system_version" != "$venv_version" ]; then
    echo "aravis.sh: Debian's PyGObject is for Python $system_version, $VENV has $venv_version: pip install PyGObject" \
        "into it instead (needs libgirepository1.0-dev, libcairo2-dev, pkg-config)" >&2
    exit 0
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$VENV/system-gi"
ln -sfn "$SYSTEM_GI" "$VENV/system-gi/gi"
echo "$(cd "$VENV" && pwd)/system-gi" > "$site/system-gi.pth"
"$VENV/bin/python" -c 'import gi; gi.require_version("Aravis", "0.8"); from gi.repository import Aravis' \
    || { echo "aravis.sh: $VENV still cannot import Aravis through gi" >&2; exit 1; }
