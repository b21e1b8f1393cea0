"""A bundle this user may not read, as the commands that load one report it."""

from __future__ import annotations

import pytest

from station_model import write_grey_bundle

pytestmark = pytest.mark.timeout(120)


def test_build_engine_on_a_bundle_file_this_user_may_not_read_is_one_line(open_tmp_path):
    """model.onnx left 0600 by another user's copy: build-engine ended in a PermissionError traceback where run, eval
    and calibrate say it in one line. Run as nobody when this is root (root reads everything)."""
    from other_user import inspectd_without

    bundle = write_grey_bundle(open_tmp_path / "b")
    private = bundle / "model.onnx"
    out = inspectd_without(private, "build-engine", str(bundle), "--fp16", "--onnxruntime")
    assert out.returncode == 2, out
    assert out.stderr.startswith(f"inspectd build-engine: {private}: cannot read (Permission denied), expected a "), out
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
