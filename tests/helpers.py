"""Test helpers shared by several test modules (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "lavcap_hf" or name.startswith("lavcap_hf."):
                raise ImportError("lavcap_hf is blocked in this process")
    sys.meta_path.insert(0, _Block())
    """
)


def run_without_package(code: str, tmp_path) -> str:
    """Run `code` in a fresh interpreter in which `import lavcap_hf` fails; returns stdout."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
