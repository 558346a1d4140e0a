"""The decode kernels' shared-memory layout, checked on the host: compiles
tests/decode_layout_check.cu against csrc/ with nvcc (skipped without it)
and runs it (bijective chunk map, ldmatrix lane addresses, no bank
conflicts, aligned 32-byte sectors where the rows are unpadded, and the
copy engine's unit-major layout against its 128-byte swizzle)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_decode_shared_memory_layout(tmp_path):
    exe = tmp_path / "decode_layout_check"
    subprocess.run(["nvcc", "-std=c++17", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "tests", "decode_layout_check.cu"), "-o", str(exe)],
                   check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout
    assert len(lines) == 16 and all(line.endswith(" ok") for line in lines), run.stdout
    # Head dims that are a multiple of 64 keep unpadded rows.
    for line in lines:
        d = int(line.split()[0].split("=")[1])
        row_bytes = int(line.split()[2].split("=")[1])
        assert (row_bytes == 2 * d) == (d % 64 == 0), line
