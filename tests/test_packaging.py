"""The wheel ships every csrc/ file the JIT build reads (the full install check is .ci/check_wheel.sh)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_native_sources(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("gard_kernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "csrc").rglob("*")
        if path.suffix in (".cpp", ".cu", ".h")
    )
    assert sources, "found no sources under csrc/"
    missing = [path for path in sources if "gard_kernels/_csrc/" + path.removeprefix("csrc/") not in names]
    assert not missing, f"the wheel lacks {missing}; add their patterns to CSRC_FILES in setup.py"
    # The source checkout's own layout must not leak into the wheel as a top-level package.
    assert not any(name.startswith(("csrc/", "tests/", "benchmarks/")) for name in names)
