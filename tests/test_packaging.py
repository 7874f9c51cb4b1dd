"""`pip install .` ships what the package reads at run time (not only what imports)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_builtin_model_kernel_source_and_prompts(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("mesh_node-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "mesh_node/engine/builtin/model.safetensors",
        "mesh_node/engine/builtin/tokenizer.json",
        "mesh_node/engine/builtin/chat_template.jinja",
        "mesh_node/engine/cpu_kernels.c",
        "mesh_node/placement/calibration_prompts.txt",
        "mesh_node/console/page/index.html",
    ):
        assert needed in names, needed
