"""Run the `minigpt4` CLI in a subprocess that cannot import torch or transformers.

`run_torch_free_cli(tmp, *args, env=None, extra_path=(), cwd=None, stdin=None)`: a `sitecustomize.py`
under `tmp/blocker`, first on PYTHONPATH, makes any import of torch/transformers raise ImportError, so a
passing run proves the command's path is torch-free. `env` replaces the inherited environment
(PYTHONPATH is still taken from the current process); `extra_path` entries follow the blocker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, _Block())
    """
)


def run_torch_free_cli(
    tmp: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    extra_path: Sequence[str | Path] = (),
    cwd: Path | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    site = tmp / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_TORCH)
    run_env = dict(os.environ if env is None else env)
    paths = [str(site), *map(str, extra_path), os.environ.get("PYTHONPATH", "")]
    run_env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run(
        [sys.executable, "-m", "minigpt4_local.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=run_env,
        cwd=cwd,
        input=stdin,
    )
