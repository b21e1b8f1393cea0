#!/bin/sh
# Installs inspectd on a station: service user, virtualenv under /opt/inspectd, config in /etc/inspectd, state in
# /var/lib/inspectd, systemd units. Idempotent: a second run with the same source changes nothing on disk.
#
#   sudo deploy/install.sh                    runtime only (no torch): inspectd run/subscribe/calibrate/bridge
#   sudo deploy/install.sh --with-train       also the training stack (torch, timm, onnx)
#   sudo deploy/install.sh --with-plc         also pymodbus and asyncua for `inspectd bridge modbus` and `bridge opcua`
#   sudo deploy/install.sh --with-gpu cu13    a GPU station whose driver runs CUDA 13 (r580+; cu12: r535..r575):
#                                             onnxruntime-gpu in place of onnxruntime, cuda-bindings and onnx
#                                             (docs/GPU.md); TensorRT, if wanted, is installed by hand
#   sudo deploy/install.sh --with-train --torch-index https://download.pytorch.org/whl/cpu
#                                             the training stack with CPU-only torch (no CUDA wheels, GBs smaller)
#   deploy/install.sh --prefix /tmp/root --no-venv
#                                             a scratch root for tests: no useradd, chown or systemctl; every path
#                                             lands under the prefix; no pip run
#
# pip installs the versions pinned in constraints.txt (the ones the tests passed with), which need the Python named
# in its header; --no-constraints takes the newest versions pyproject.toml's ranges allow instead. It builds a
# throwaway copy of the source, never the checkout itself. Each enabled or active inspectd unit's config is checked
# (`inspectd run --check`) by the version in the virtualenv before pip replaces it and by the new one after: the
# install fails (exit 1) only for a config the old version accepted and the new one refuses, a unit one restart away
# from staying down; a config refused by both, or missing, is a warning. The units keep running the old version until
# they are restarted, which the last line says how to do.
#
# The options that choose what pip installs (--with-train, --with-plc, --with-gpu, --torch-index, --no-constraints)
# are kept beside the virtualenv before pip runs, and a rerun that leaves one out takes it again and says so: a GPU
# station updated with a bare `install.sh`, or retried after a failed one, keeps onnxruntime-gpu instead of getting
# the CPU build back. A virtualenv whose install kept none is taken for the extras it holds (pymodbus, torch,
# onnxruntime-gpu and the CUDA its version is built for). --without-train, --without-plc, --without-gpu,
# --without-torch-index and --with-constraints leave a kept option out on purpose.
set -eu

usage() {
    cat <<'EOF'
usage: install.sh [--prefix DIR] [--no-venv] [--with-train] [--with-plc] [--with-gpu cu12|cu13] [--python PY]
                  [--torch-index URL] [--no-constraints] [--without-train] [--without-plc] [--without-gpu]
                  [--without-torch-index] [--with-constraints]

  --prefix DIR   install into DIR as if it were / (no useradd, chown, systemctl)
  --no-venv      do not create the virtualenv or run pip
  --with-train   add the [train] extra (torch, timm, onnx, ...)
  --with-plc     add the [plc] extra (pymodbus, asyncua) for `inspectd bridge modbus` and `inspectd bridge opcua`
  --with-gpu cu12|cu13
                 a GPU station, by the CUDA major its driver runs (nvidia-smi: "CUDA Version"): the [gpu-cuNN]
                 extra (cuda-bindings, onnx) and onnxruntime-gpu for that CUDA in place of onnxruntime; what the
                 virtualenv holds for the other CUDA (its wheels, a torch built on them) is taken out first
  --python PY    interpreter that creates the virtualenv (default: python3); an existing virtualenv made by
                 another interpreter is made again with PY (without --python it is kept as it is)
  --torch-index URL
                 take torch and torchvision from this index, e.g. https://download.pytorch.org/whl/cpu for the
                 CPU-only wheels (default: PyPI, whose Linux wheels carry CUDA)
  --no-constraints
                 install within pyproject.toml's ranges instead of the versions pinned in constraints.txt
                 (e.g. on a Python older than the pins need)
  --without-train, --without-plc, --without-gpu, --without-torch-index, --with-constraints
                 leave out an option the last install was given: without them a rerun takes each one again, and
                 says so (they are kept beside the virtualenv, /opt/inspectd/install-options)
EOF
}

die() { echo "install.sh: $*" >&2; exit 2; }

PREFIX=""
PREFIX_GIVEN=0
MAKE_VENV=1
TRAIN=0
PLC=0
PYTHON=python3
PYTHON_GIVEN=0
TORCH_INDEX=""
USE_CONSTRAINTS=1
GPU=""
# The kept options (train plc gpu torch-index constraints) this command line names, to give or to leave out.
GIVEN=" "
DROPPED=" "
given() { GIVEN="$GIVEN$1 "; }
dropped() { DROPPED="$DROPPED$1 "; }
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix: expected a directory"; PREFIX="$2"; PREFIX_GIVEN=1; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; PREFIX_GIVEN=1; shift ;;
        --no-venv) MAKE_VENV=0; shift ;;
        --with-train) TRAIN=1; given train; shift ;;
        --with-plc) PLC=1; given plc; shift ;;
        --with-gpu) [ $# -ge 2 ] || die "--with-gpu: expected cu12 or cu13"; GPU="$2"; given gpu; shift 2 ;;
        --with-gpu=*) GPU="${1#--with-gpu=}"; given gpu; shift ;;
        --python) [ $# -ge 2 ] || die "--python: expected an interpreter"; PYTHON="$2"; PYTHON_GIVEN=1; shift 2 ;;
        --torch-index) [ $# -ge 2 ] || die "--torch-index: expected an index URL"; TORCH_INDEX="$2"; given torch-index
            shift 2 ;;
        --torch-index=*) TORCH_INDEX="${1#--torch-index=}"; given torch-index; shift ;;
        --no-constraints) USE_CONSTRAINTS=0; given constraints; shift ;;
        --without-train) dropped train; shift ;;
        --without-plc) dropped plc; shift ;;
        --without-gpu) dropped gpu; shift ;;
        --without-torch-index) dropped torch-index; shift ;;
        --with-constraints) dropped constraints; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
done

# `--prefix "$DESTDIR"` with the variable unset or empty: an install onto this system is never what that meant.
[ "$PREFIX_GIVEN" = 0 ] || [ -n "$PREFIX" ] ||
    die "--prefix: expected a directory, got an empty string (leave --prefix out for a system install)"

# --- the options the last install was given ---------------------------------------------------------------------
# The option that gives a kept one, and the one that leaves it out.
option_of() {  # key
    case "$1" in
        torch-index) echo --torch-index ;;
        constraints) echo --no-constraints ;;
        *) echo "--with-$1" ;;
    esac
}
leave_out_of() {  # key
    case "$1" in
        constraints) echo --with-constraints ;;
        *) echo "--without-$1" ;;
    esac
}
for key in $DROPPED; do
    case "$GIVEN" in
        *" $key "*) die "$(option_of "$key") and $(leave_out_of "$key"): expected one of them" ;;
    esac
done
# Paths before the prefix is made: nothing is created until the options are known to be sound. The record is kept
# beside the venv, not in it: a venv made again (`venv --clear`) would take it along, and the retry of an install
# whose pip then failed would run without it.
OPTIONS_FILE="$PREFIX/opt/inspectd/install-options"
# Where the install.sh before this kept it.
OLD_OPTIONS_FILE="$PREFIX/opt/inspectd/venv/.inspectd-options"
RECORD=""
if [ "$MAKE_VENV" -eq 1 ]; then
    for file in "$OPTIONS_FILE" "$OLD_OPTIONS_FILE"; do
        if [ -f "$file" ]; then RECORD=$file; break; fi
    done
fi
REUSED=""
LEAVE_OUT=""
if [ -n "$RECORD" ]; then
    while IFS= read -r line; do
        option=${line%% *}
        value=${line#"$option"}
        value=${value# }
        case "$option" in
            --with-train) key=train ;;
            --with-plc) key=plc ;;
            --with-gpu) key=gpu ;;
            --torch-index) key=torch-index ;;
            --no-constraints) key=constraints ;;
            *) die "$RECORD: '$line': expected an option install.sh keeps there (remove the file, and give" \
                "this run every option the station needs)" ;;
        esac
        case "$GIVEN$DROPPED" in *" $key "*) continue ;; esac
        case "$key" in
            train) TRAIN=1 ;;
            plc) PLC=1 ;;
            gpu) GPU=$value ;;
            # Only with the training stack it is for (the file lists --with-train first).
            torch-index) [ "$TRAIN" -eq 1 ] || continue; TORCH_INDEX=$value ;;
            constraints) USE_CONSTRAINTS=0 ;;
        esac
        REUSED="$REUSED $line"
        LEAVE_OUT="${LEAVE_OUT:+$LEAVE_OUT, }$(leave_out_of "$key")"
    done < "$RECORD"
fi
[ -z "$REUSED" ] ||
    echo "install.sh: reusing the last install's options:$REUSED ($LEAVE_OUT to leave out)"
leaves_out() { case "$DROPPED" in *" $1 "*) return 0 ;; esac; return 1; }
# The version of a distribution in a venv, by its dist-info folder (the name as pip writes it there: lower case,
# "_" for "-"), or a failure where it is not installed.
dist_version() {  # venv name
    for dist in "$1"/lib/python3*/site-packages/"$2"-*.dist-info; do
        if [ -d "$dist" ]; then
            dist=${dist##*/}
            dist=${dist#"$2"-}
            echo "${dist%.dist-info}"
            return 0
        fi
    done
    return 1
}
gpu_build_in() { dist_version "$1" onnxruntime_gpu >/dev/null; }  # venv
# The CUDA major an onnxruntime-gpu version from PyPI is built for: 12 up to 1.26, 13 from 1.27 (docs/GPU.md).
cuda_of() {  # onnxruntime-gpu version
    case "$1" in
        1.[0-9].*|1.1[0-9].*|1.2[0-6].*) echo cu12 ;;
        *) echo cu13 ;;
    esac
}
# A venv whose install kept no options (an install.sh before it did) is taken for what it holds: installing inspectd
# without its extras would leave pymodbus, asyncua or torch unmanaged, and would put the CPU onnxruntime over
# onnxruntime-gpu, which `run --check` cannot see.
PREFIX_VENV="$PREFIX/opt/inspectd/venv"
FOUND=""
found() {  # key option evidence; fails for an option this run gives or leaves out
    case "$GIVEN$DROPPED" in *" $1 "*) return 1 ;; esac
    FOUND="$FOUND $2 ($3)"
    LEAVE_OUT="${LEAVE_OUT:+$LEAVE_OUT, }$(leave_out_of "$1")"
}
if [ "$MAKE_VENV" -eq 1 ] && [ -z "$RECORD" ]; then
    if version=$(dist_version "$PREFIX_VENV" torch); then
        if found train --with-train "torch $version"; then TRAIN=1; fi
    fi
    for dist in pymodbus asyncua; do
        if version=$(dist_version "$PREFIX_VENV" $dist); then
            if found plc --with-plc "$dist $version"; then PLC=1; fi
            break
        fi
    done
    if version=$(dist_version "$PREFIX_VENV" onnxruntime_gpu); then
        cuda=$(cuda_of "$version")
        if found gpu "--with-gpu $cuda" "onnxruntime-gpu $version, built for CUDA ${cuda#cu}"; then GPU=$cuda; fi
    fi
fi
[ -z "$FOUND" ] ||
    echo "install.sh: reusing the last install's options, told from what its virtualenv holds (an install.sh" \
        "before this kept none):$FOUND; $LEAVE_OUT to leave out"
# A GPU venv whose kept options have no --with-gpu (onnxruntime-gpu installed by hand, or a --without-gpu run that
# failed before it took the GPU build out): which build it should hold is the operator's to say.
if [ "$MAKE_VENV" -eq 1 ] && [ -z "$GPU" ] && ! leaves_out gpu &&
    version=$(dist_version "$PREFIX_VENV" onnxruntime_gpu); then
    cuda=$(cuda_of "$version")
    die "$PREFIX_VENV holds onnxruntime-gpu $version, built for CUDA ${cuda#cu}, and neither this run nor the" \
        "options kept in $RECORD have --with-gpu, which would put the CPU onnxruntime over it: give --with-gpu" \
        "$cuda to keep it, or --without-gpu for the CPU build"
fi

# In a fixed order: the stamp below compares it, and the same options must give the same stamp.
EXTRAS=""
[ "$TRAIN" -eq 0 ] || EXTRAS=train
[ "$PLC" -eq 0 ] || EXTRAS="${EXTRAS:+$EXTRAS,}plc"
case "$GPU" in
    "") ;;
    cu12|cu13) EXTRAS="${EXTRAS:+$EXTRAS,}gpu-$GPU" ;;
    *) die "--with-gpu $GPU: expected cu12 or cu13 (the CUDA major of the station's driver)" ;;
esac
case ",$EXTRAS," in
    *,train,*)
        # PyPI's Linux torch wheel requires cuda-bindings 13, which the cu12 extra excludes: pip could only fail.
        [ "$GPU" != cu12 ] || [ -n "$TORCH_INDEX" ] ||
            die "--with-gpu cu12 with --with-train: PyPI's torch needs CUDA 13 (cuda-bindings 13); give --torch-index" \
                "with a CUDA 12 torch build, or train on another machine" ;;
    *) [ -z "$TORCH_INDEX" ] || die "--torch-index: only used with --with-train (torch is for training only)" ;;
esac

# The physical path: git names the checkout by it, and a path through a symlink would not match git's.
SRC=$(cd "$(dirname "$0")/.." && pwd -P)
[ -f "$SRC/pyproject.toml" ] || die "$SRC: expected the inspectd source tree (pyproject.toml) above deploy/"

if [ -n "$PREFIX" ]; then
    mkdir -p "$PREFIX"
    ROOT=$(cd "$PREFIX" && pwd)
    SYSTEM=0
else
    ROOT=""
    SYSTEM=1
    [ "$(id -u)" -eq 0 ] || die "must run as root (or pass --prefix DIR for a scratch install)"
fi

USER_NAME=inspectd
OPT="$ROOT/opt/inspectd"
ETC="$ROOT/etc/inspectd"
STATE="$ROOT/var/lib/inspectd"
# The service's folders inside it: bundles/ holds model bundles (each with its own thresholds.json), engines/ built
# TensorRT plans, journal/ the per-camera sequence journal.
STATE_SUBDIRS="bundles engines journal"
UNITS="$ROOT/etc/systemd/system"
CHANGED=0

say() { echo "install.sh: $*"; }

# Directory with mode and owner; an existing one is only corrected, never recreated (keeps mtimes stable).
ensure_dir() {  # path mode owner:group
    if [ ! -d "$1" ]; then
        mkdir -p "$1"
        say "created $1"
        CHANGED=1
    fi
    # -L: the mode of what a symlink names (a state dir moved to another disk), not the link's own 777.
    if [ "$(stat -L -c %a "$1")" != "$(echo "$2" | sed 's/^0*//')" ]; then
        chmod "$2" "$1"
        CHANGED=1
    fi
    [ "$SYSTEM" -eq 0 ] || chown "$3" "$1"
}

# As the service user on a station (where there is one), as whoever runs this in a scratch root. Without runuser
# (util-linux, on every Debian and Ubuntu) a station's folder modes are set as root: a link swapped in after
# check_service_dir would then have its target's mode set, though never its owner.
as_service_user() {
    if [ "$SYSTEM" -eq 1 ] && command -v runuser >/dev/null; then
        runuser -u "$USER_NAME" -- "$@"
    else
        "$@"
    fi
}

# A folder inside the state folder, which the service user owns: that user can put a link (or a file) in its place,
# and a chmod or chown run as root follows a link to whatever it names (bundles -> /etc would hand /etc to the
# service). A link is refused; the folder is made and its mode set as the service user, so that a link swapped in
# between the check and the change borrows no right the service does not already have.
check_service_dir() {  # path
    if [ -L "$1" ]; then
        die "$1: a symbolic link (to $(readlink "$1")), expected a directory; put what it names in its place" \
            "and rerun"
    fi
    if [ -e "$1" ] && [ ! -d "$1" ]; then
        die "$1: not a directory, expected the service's $(basename "$1") folder; move it away and rerun"
    fi
}
ensure_service_dir() {  # path mode
    check_service_dir "$1"
    if [ ! -d "$1" ]; then
        as_service_user mkdir "$1"
        say "created $1"
        CHANGED=1
    fi
    # -h: the folder itself, never what a link swapped in since the check names.
    if [ "$SYSTEM" -eq 1 ] && [ "$(stat -c %U:%G "$1")" != "$USER_NAME:$USER_NAME" ]; then
        chown -h "$USER_NAME:$USER_NAME" "$1"
        CHANGED=1
    fi
    if [ "$(stat -c %a "$1")" != "$(echo "$2" | sed 's/^0*//')" ]; then
        as_service_user chmod "$2" "$1"
        CHANGED=1
    fi
}

# Copy a file only when its content or mode differs, so a rerun leaves it untouched.
ensure_file() {  # src dst mode owner:group
    if [ ! -f "$2" ] || ! cmp -s "$1" "$2"; then
        install -m "$3" "$1" "$2"
        say "installed $2"
        CHANGED=1
    elif [ "$(stat -L -c %a "$2")" != "$(echo "$3" | sed 's/^0*//')" ]; then
        chmod "$3" "$2"
        CHANGED=1
    fi
    [ "$SYSTEM" -eq 0 ] || chown "$4" "$2"
}

# --- interpreter: checked before anything is created -----------------------------------------------------------
VENV="$OPT/venv"
CONSTRAINTS="$SRC/constraints.txt"
# A venv counts as made once its pip runs: `python3 -m venv` without Debian's python3-venv leaves bin/python and no pip.
venv_ready() { "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }
# The interpreter PY runs on, or a venv's python the one it was made by: its real path and its version.
python_id() {  # PY
    "$1" -c 'import os, sys
print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), "%d.%d" % sys.version_info[:2])' 2>/dev/null
}
NEW_VENV=0
if [ "$MAKE_VENV" -eq 1 ]; then
    if ! venv_ready; then
        NEW_VENV=1
    elif [ "$PYTHON_GIVEN" -eq 1 ] && [ "$(python_id "$VENV/bin/python")" != "$(python_id "$PYTHON")" ]; then
        # Its packages were built for the interpreter it was made by: pip cannot move them to another one.
        NEW_VENV=1
    fi
fi
if [ "$NEW_VENV" -eq 1 ]; then
    command -v "$PYTHON" >/dev/null || die "--python $PYTHON: not found, expected a Python 3 interpreter"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
        die "$PYTHON cannot create a virtualenv; install its venv module (Debian/Ubuntu: apt install python3-venv)"
fi
if [ "$MAKE_VENV" -eq 1 ] && [ "$USE_CONSTRAINTS" -eq 1 ]; then
    [ -f "$CONSTRAINTS" ] || die "$CONSTRAINTS: missing (or pass --no-constraints)"
    # The pinned versions install only on the Python the file's header names (what make constraints recorded).
    NEED=$(sed -n 's/^# requires-python: >=\([0-9.]*\).*/\1/p' "$CONSTRAINTS")
    CHECKED="$PYTHON"
    [ "$NEW_VENV" -eq 1 ] || CHECKED="$VENV/bin/python"
    HAVE=$("$CHECKED" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$CHECKED: cannot run it"
    "$CHECKED" -c "import sys; sys.exit(sys.version_info[:2] < tuple(int(p) for p in '$NEED'.split('.')))" ||
        die "$CHECKED is Python $HAVE; the versions in constraints.txt need >= $NEED" \
            "(--python python$NEED, or --no-constraints)"
fi

if [ "$MAKE_VENV" -eq 1 ]; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
fi
# Only pip reads the merged pins: with --no-venv there is neither pip nor $WORK.
if [ "$MAKE_VENV" -eq 1 ] && [ "$GPU" = cu12 ] && [ "$USE_CONSTRAINTS" -eq 1 ]; then
    # constraints.txt pins the CUDA 13 builds; deploy/constraints-cu12.txt replaces those pins for a CUDA 12 driver.
    OVERRIDES="$SRC/deploy/constraints-cu12.txt"
    CONSTRAINTS="$WORK/constraints.txt"
    NAMES=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' "$OVERRIDES" | paste -sd'|')
    { grep -v -E "^($NAMES)==" "$SRC/constraints.txt"; cat "$OVERRIDES"; } > "$CONSTRAINTS"
fi

# pip builds in the tree it is given (build/, inspectd.egg-info): in the operator's checkout, as root, that leaves
# root-owned files the operator cannot remove, and setuptools never prunes build/lib, so a module deleted from the
# source would be installed again. It gets a fresh copy instead: with git, the files git knows of (tracked, and new
# ones it does not ignore) as they are in the working tree, so an uncommitted fix is installed as it always was;
# without git, the tree less what .gitignore names (runs, bundles, datasets: gigabytes in mktemp's /tmp) and what a
# build, a virtualenv or a tool's cache leaves in it.
copy_source() {  # destination
    mkdir -p "$1"
    if [ "$(src_git rev-parse --show-toplevel 2>/dev/null)" = "$SRC" ] ||
        { GIT_AS=self && [ "$(src_git rev-parse --show-toplevel 2>/dev/null)" = "$SRC" ]; }; then
        # A tracked file deleted in the working tree is still listed: only what exists is copied.
        (cd "$SRC" && src_git ls-files -z --cached --others --exclude-standard |
            xargs -0 sh -c 'for f; do if [ -e "$f" ] || [ -L "$f" ]; then printf "%s\0" "$f"; fi; done' sh |
            tar --null -T - -cf -) | tar -C "$1" -xf -
    else
        # GNU tar's own reading of .gitignore files skips the patterns that end in "/" (/runs/, .venv/): the top-level
        # file's patterns are given again as excludes, without that "/", and anchored where git anchors them.
        { [ ! -f "$SRC/.gitignore" ] ||
            sed -e 's:/*$::' -e '/^[#!]/d' -e '/^$/d' -e 's:^/:./:' -e '/^\.\//!s:^\(.*/.*\)$:./\1:' \
                "$SRC/.gitignore"; } |
            tar -C "$SRC" -X - --exclude-vcs-ignores --exclude=./.git --exclude=./build --exclude=./dist \
                --exclude='*.egg-info' --exclude=./.venv --exclude=__pycache__ --exclude=.pytest_cache \
                --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.hypothesis -cf - . | tar -C "$1" -xf -
    fi
}

# git on the checkout. As root on a checkout another user owns, git refuses the repository unless it is a
# safe.directory, and git 2.35.2 to 2.37 and the distributions' backports of that check (Debian 11, Ubuntu 22.04)
# take safe.directory only from a system or global config, never from -c: git runs as the owner there, with the
# owner's home for its config (root's is not readable to it, and git stops on a config it cannot read).
# Where the owner cannot run git there (a parent directory closed to it), git runs as this user instead (GIT_AS=self).
GIT_AS=owner
src_git() {
    owner=$(stat -c %U "$SRC")
    home=$(getent passwd "$owner" | cut -d: -f6)
    if [ "$GIT_AS" = owner ] && [ "$(id -u)" -eq 0 ] && [ "$owner" != root ] && [ -n "$home" ] &&
        command -v runuser >/dev/null; then
        runuser -u "$owner" -- env HOME="$home" XDG_CONFIG_HOME= git -c safe.directory="$SRC" -C "$SRC" "$@"
    else
        git -c safe.directory="$SRC" -C "$SRC" "$@"
    fi
}

# What the venv holds for the CUDA major other than this run's (cu12|cu13), one name a line: the NVIDIA wheels the
# other major's constraints pin (deploy/constraints-cu12.txt's for CUDA 12, constraints.txt's for CUDA 13), any other
# nvidia-*-cuNN of that major (torch's own nccl, cusparselt), an onnxruntime-gpu built for it, and with the training
# stack a torch (and torchvision) built on those wheels, which pip would otherwise find already installed and keep.
other_cuda_wheels() {  # cu12|cu13
    case "$1" in
        cu13) other=cu12; pins="$SRC/deploy/constraints-cu12.txt" ;;
        *) other=cu13; pins="$SRC/constraints.txt" ;;
    esac
    wheels=$(
        for name in $(sed -n 's/^\(nvidia-[A-Za-z0-9_.-]*\)==.*/\1/p' "$pins"); do
            if dist_version "$VENV" "$(echo "$name" | tr 'A-Z.-' 'a-z__')" >/dev/null; then echo "$name"; fi
        done
        for dist in "$VENV"/lib/python3*/site-packages/nvidia_*_"$other"-*.dist-info; do
            if [ -d "$dist" ]; then dist=${dist##*/}; echo "${dist%%-*}" | tr _ -; fi
        done
        if version=$(dist_version "$VENV" onnxruntime_gpu) && [ "$(cuda_of "$version")" = "$other" ]; then
            echo onnxruntime-gpu
        fi
    )
    echo "$wheels" | sed '/^$/d' | LC_ALL=C sort -u
    nvidia=$(echo "$wheels" | grep '^nvidia-' | paste -sd'|' -)
    if [ "$TRAIN" -eq 1 ] && [ -n "$nvidia" ]; then
        for metadata in "$VENV"/lib/python3*/site-packages/torch-*.dist-info/METADATA; do
            [ -f "$metadata" ] && grep -qiE "^Requires-Dist: ($nvidia)([^A-Za-z0-9_.-]|\$)" "$metadata" || continue
            echo torch
            if dist_version "$VENV" torchvision >/dev/null; then echo torchvision; fi
        done
    fi
}

pip_install() {
    if [ "$USE_CONSTRAINTS" -eq 1 ]; then
        "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "$@"
    else
        "$VENV/bin/python" -m pip install -q "$@"
    fi
}

# --- the service's state folders: checked before anything is created --------------------------------------------
# Refused here, not when the state is reached: by then pip has replaced the venv and stamped it, and a rerun after the
# operator's fix would skip the check of the units' configs against the new version.
# The state folder itself may be a link (to a folder on another disk), but to one that is there: a disk not mounted
# leaves a link to nothing, which would end the install late, in a bare `mkdir: File exists`.
if [ -L "$STATE" ] && [ ! -d "$STATE" ]; then
    die "$STATE: a symbolic link to nothing ($(readlink "$STATE")), expected a directory: mount what it names and rerun"
fi
if [ -e "$STATE" ] && [ ! -d "$STATE" ]; then
    die "$STATE: not a directory, expected the service's state folder; move it away and rerun"
fi
for sub in $STATE_SUBDIRS; do
    check_service_dir "$STATE/$sub"
done

# --- service user -----------------------------------------------------------------------------------------------
if [ "$SYSTEM" -eq 1 ]; then
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/inspectd --no-create-home \
            --shell /usr/sbin/nologin --comment "inspectd line inspection" "$USER_NAME"
        say "created system user $USER_NAME"
    fi
    # Cameras are group video, GPU render nodes group render. The units name both in SupplementaryGroups= and systemd
    # refuses to start a service whose group does not exist (216/GROUP), so a station without one gets it empty.
    for group in video render; do
        if ! getent group "$group" >/dev/null; then
            groupadd --system "$group"
            say "created system group $group (no device uses it on this station yet)"
        fi
        if ! id -nG "$USER_NAME" | tr ' ' '\n' | grep -qx "$group"; then
            usermod -a -G "$group" "$USER_NAME"
            say "added $USER_NAME to group $group"
        fi
    done
fi

# --- the units that run here: what the new version must start with -------------------------------------------
# Enabled ones (a link in a .wants directory) and, on a running systemd, active ones; one name a line.
units_here() {
    {
        for link in "$UNITS"/*.wants/inspectd.service "$UNITS"/*.wants/inspectd@?*.service \
            "$UNITS"/*.wants/inspectd-bridge@?*.service; do
            if [ -L "$link" ] || [ -e "$link" ]; then basename "$link"; fi  # else an unmatched pattern
        done
        if [ "$SYSTEM" -eq 1 ] && [ -d /run/systemd/system ]; then
            systemctl list-units --state=active --plain --no-legend \
                inspectd.service 'inspectd@*.service' 'inspectd-bridge@*.service' 2>/dev/null | cut -d' ' -f1
        fi
    } | LC_ALL=C sort -u
}
RUNNING=$(units_here | paste -sd' ' -)
# The config a daemon unit starts with; nothing for a bridge (its command line is in its env file, checked when it
# starts).
unit_config() {  # unit
    case "$1" in
        inspectd.service) echo "$ETC/inspectd.yaml" ;;
        inspectd@?*.service) instance="${1#inspectd@}"; echo "$ETC/${instance%.service}.yaml" ;;
    esac
}
# The daemon's own check by the version in the venv, as the service user where there is one; a refusal's last line
# on stdout.
# CHECK_STATUS: 0 accepted, 2 refused, anything else the check could not run (a venv broken by a Python upgrade).
check_config() {  # config
    set -- "$1"
    # A --prefix tree is never chowned, and no unit here runs its configs: a check as root would also load them as
    # this machine's service user, who cannot read them. Only a version that knows --service-user is given it (an
    # older one refuses the option, which would pass for a refused config).
    if [ "$SYSTEM" -eq 0 ] && "$VENV/bin/inspectd" run --help 2>/dev/null | grep -q -e --service-user; then
        set -- "$1" --service-user ''
    fi
    if refusal=$(cd / && as_service_user "$VENV/bin/inspectd" run --check --config "$@" 2>&1 >/dev/null); then
        CHECK_STATUS=0
        return 0
    else
        CHECK_STATUS=$?
    fi
    echo "$refusal" | sed '/^$/d' | tail -n 1
    return 1
}
# Before pip replaces the venv: the units whose config the version in it accepts, the only ones an upgrade can take
# from running to refused. A unit it refuses could not start before either.
# A version that could not check at all counts as accepting (a new refusal then fails the install, rather than pass
# as a warning). Units an earlier install found accepted before it and refused after stay so (PENDING) until an
# install's check passes: that install left the refused version in the venv, the one a rerun would compare with.
OLD_ACCEPTED=" "
OLD_CHECKED=0
# Beside the venv, which `venv --clear` empties, as the options are; the second path is where the install.sh before
# this kept it.
PENDING="$OPT/install-accepted-before"
OLD_PENDING="$VENV/.inspectd-accepted-before"
remember_old_verdicts() {
    [ "$OLD_CHECKED" -eq 0 ] || return 0
    OLD_CHECKED=1
    for kept in "$PENDING" "$OLD_PENDING"; do
        if [ -f "$kept" ]; then OLD_ACCEPTED=" $(paste -sd' ' - < "$kept") "; break; fi
    done
    [ -x "$VENV/bin/inspectd" ] || return 0
    for unit in $RUNNING; do
        config=$(unit_config "$unit")
        if [ -n "$config" ] && [ -f "$config" ]; then
            if check_config "$config" >/dev/null || [ "$CHECK_STATUS" -ne 2 ]; then
                OLD_ACCEPTED="$OLD_ACCEPTED$unit "
            fi
        fi
    done
}

# --- program ----------------------------------------------------------------------------------------------------
ensure_dir "$ROOT/opt" 0755 root:root
ensure_dir "$OPT" 0755 root:root
ensure_dir "$OPT/share" 0755 root:root
ensure_dir "$OPT/share/doc" 0755 root:root
# Every guide and the images they show: the units' Documentation= names DEPLOY.md and PLC.md, which link the others.
for doc in "$SRC"/docs/*.md "$SRC"/docs/*.png; do
    [ ! -f "$doc" ] || ensure_file "$doc" "$OPT/share/doc/$(basename "$doc")" 0644 root:root
done

# The options this run installs with, kept before pip runs: a run that fails (no index reached, a full disk) leaves
# them for its retry, which takes them again. The stamp alone says that an install succeeded.
options_text() {
    [ "$TRAIN" -eq 0 ] || echo --with-train
    [ "$PLC" -eq 0 ] || echo --with-plc
    [ -z "$GPU" ] || echo "--with-gpu $GPU"
    [ -z "$TORCH_INDEX" ] || echo "--torch-index $TORCH_INDEX"
    [ "$USE_CONSTRAINTS" -eq 1 ] || echo --no-constraints
}
if [ "$MAKE_VENV" -eq 1 ]; then
    if [ ! -f "$OPTIONS_FILE" ] || [ "$(cat "$OPTIONS_FILE")" != "$(options_text)" ]; then
        options_text > "$OPTIONS_FILE"
    fi
    rm -f "$OLD_OPTIONS_FILE"
fi

INSTALLED=0
if [ "$MAKE_VENV" -eq 1 ]; then
    if [ "$NEW_VENV" -eq 1 ]; then
        remember_old_verdicts
        # --clear: a half-made venv, or one made by another interpreter, is emptied first.
        "$PYTHON" -m venv --clear "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        say "created virtualenv $VENV with $(python_id "$VENV/bin/python")"
    fi
    # pip reinstalls a source directory on every run; the stamp (hash of sources, extras and interpreter) makes
    # reruns no-ops.
    STAMP=$(cd "$SRC" && { echo "extras=$EXTRAS pin=$USE_CONSTRAINTS torch-index=$TORCH_INDEX gpu=$GPU"
        echo "python=$(python_id "$VENV/bin/python")"
        find pyproject.toml constraints.txt deploy/constraints-cu12.txt inspectd engines calibration -name '*.py' \
            -o -name pyproject.toml -o -name 'constraints*.txt' | LC_ALL=C sort | xargs sha256sum; } | sha256sum |
            cut -d' ' -f1)
    if [ "$(cat "$VENV/.inspectd-stamp" 2>/dev/null || true)" != "$STAMP" ]; then
        remember_old_verdicts
        if [ -n "$GPU" ] && OTHER=$(other_cuda_wheels "$GPU") && [ -n "$OTHER" ]; then
            say "--with-gpu $GPU: removing what $VENV holds for the other CUDA first, which pip would leave beside" \
                "CUDA ${GPU#cu}'s (both cuDNN wheels write the same files):" $OTHER
            # shellcheck disable=SC2086 # one name a word
            "$VENV/bin/python" -m pip uninstall -q -y $OTHER
        fi
        case ",$EXTRAS," in
            *,train,*) [ -z "$TORCH_INDEX" ] || pip_install --index-url "$TORCH_INDEX" torch torchvision ;;
        esac
        copy_source "$WORK/src"
        if [ -z "$GPU" ] && gpu_build_in "$VENV"; then
            # --without-gpu: both builds install the `onnxruntime` module, so the GPU one goes before inspectd brings
            # the CPU one.
            "$VENV/bin/python" -m pip uninstall -q -y onnxruntime onnxruntime-gpu
        fi
        pip_install "$WORK/src${EXTRAS:+[$EXTRAS]}"
        if [ -n "$GPU" ]; then
            # onnxruntime-gpu and onnxruntime both install the `onnxruntime` module, and installing inspectd brings
            # the CPU build back each time: remove both, then install the GPU build alone. [cuda,cudnn]: the CUDA
            # and cuDNN libraries as wheels, loaded by the backend (onnxruntime.preload_dlls): only the driver is
            # needed from the system.
            "$VENV/bin/python" -m pip uninstall -q -y onnxruntime onnxruntime-gpu
            pip_install "onnxruntime-gpu[cuda,cudnn]"
            "$VENV/bin/python" -c 'import onnxruntime as o, sys
sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' ||
                die "onnxruntime-gpu installed but has no CUDAExecutionProvider"
        fi
        echo "$STAMP" > "$VENV/.inspectd-stamp"
        say "installed inspectd${EXTRAS:+[$EXTRAS]} into $VENV"
        CHANGED=1
        INSTALLED=1
    fi
fi

# --- config: root owns it, the service reads it ------------------------------------------------------------------
ensure_dir "$ROOT/etc" 0755 root:root
ensure_dir "$ETC" 0750 "root:$USER_NAME"
# CurveZMQ: the daemon's own key pair must be owned by the service user and private (inspectd.protocol.keys refuses
# anything else); the allow-list of client public keys is root's to edit and must not be group/other-writable.
ensure_dir "$ETC/keys" 0700 "$USER_NAME:$USER_NAME"
ensure_dir "$ETC/clients" 0750 "root:$USER_NAME"
for example in "$SRC"/deploy/*.example.yaml; do
    [ -f "$example" ] || continue
    target="$ETC/$(basename "$example" .example.yaml).yaml"
    # An operator's config is never overwritten; the shipped example sits next to it for comparison.
    if [ ! -f "$target" ]; then
        ensure_file "$example" "$target" 0640 "root:$USER_NAME"
    fi
    ensure_file "$example" "$target.example" 0640 "root:$USER_NAME"
done
# A PLC bridge instance's command line (systemd/inspectd-bridge@.service reads /etc/inspectd/bridge-<instance>.env).
ensure_file "$SRC/deploy/bridge.example.env" "$ETC/bridge.env.example" 0640 "root:$USER_NAME"

# --- state: the service owns it ---------------------------------------------------------------------------------
ensure_dir "$ROOT/var" 0755 root:root
ensure_dir "$ROOT/var/lib" 0755 root:root
ensure_dir "$STATE" 0750 "$USER_NAME:$USER_NAME"
for sub in $STATE_SUBDIRS; do
    ensure_service_dir "$STATE/$sub" 0750
done

# --- systemd units ----------------------------------------------------------------------------------------------
ensure_dir "$ROOT/etc/systemd" 0755 root:root
ensure_dir "$UNITS" 0755 root:root
UNITS_BEFORE=$CHANGED
CHANGED=0
for unit in inspectd.service inspectd@.service inspectd-bridge@.service; do
    ensure_file "$SRC/systemd/$unit" "$UNITS/$unit" 0644 root:root
done
UNITS_CHANGED=$CHANGED
if [ "$SYSTEM" -eq 1 ] && [ "$CHANGED" -eq 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemctl daemon-reload"
fi
[ "$UNITS_BEFORE" -eq 0 ] || CHANGED=1

# --- the new version on the units' configs ----------------------------------------------------------------------
REFUSED=0
if [ "$INSTALLED" -eq 1 ]; then
    for unit in $RUNNING; do
        config=$(unit_config "$unit")
        [ -n "$config" ] || continue
        if [ ! -f "$config" ]; then
            echo "install.sh: WARNING: $unit: no config at $config, not checked; the unit cannot start until it is" \
                "written" >&2
        elif ! refusal=$(check_config "$config"); then
            case "$OLD_ACCEPTED" in
                *" $unit "*)
                    echo "install.sh: $unit ($config): the new version refuses this config, which the old one" \
                        "accepted: $refusal. The unit keeps running the old code until it is restarted, and its next" \
                        "restart (watchdog, crash, reboot) will be refused and not retried (RestartPreventExitStatus=2):" \
                        "fix the config before anything restarts it" >&2
                    REFUSED=1 ;;
                *)
                    echo "install.sh: WARNING: $unit ($config) cannot start with this config, and could not before" \
                        "this install either: $refusal" >&2 ;;
            esac
        fi
    done
fi

if [ "$INSTALLED" -eq 1 ] && [ "$REFUSED" -eq 0 ]; then
    rm -f "$PENDING" "$OLD_PENDING"
fi
if [ "$REFUSED" -eq 1 ]; then
    # A rerun installs and checks again (not "nothing to do"), against what the units accepted before the first try.
    rm -f "$VENV/.inspectd-stamp"
    for unit in $OLD_ACCEPTED; do echo "$unit"; done > "$PENDING"
    rm -f "$OLD_PENDING"
    echo "install.sh: installed, but the new version refuses a config the old one accepted (above): fix it, check" \
        "it with $VENV/bin/inspectd run --check --config FILE, then systemctl try-restart $RUNNING" >&2
    exit 1
elif [ "$CHANGED" -eq 0 ]; then
    say "nothing to do, ${ROOT:-/} is up to date"
elif [ -n "$RUNNING" ] && { [ "$INSTALLED" -eq 1 ] || [ "$UNITS_CHANGED" -eq 1 ]; }; then
    # Running units keep the old version (and unit settings) until they restart; try-restart leaves stopped ones be.
    say "done; to run the new version: systemctl try-restart $RUNNING"
else
    say "done; next: edit $ETC/inspectd.yaml, then systemctl enable --now inspectd (see docs/DEPLOY.md)"
fi
