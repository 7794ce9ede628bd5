"""`python -m tests.support.fake_server PORT [DELAY] [--fail-load]`: `server.run.serve` on the fake engine.

Contract: runs the real runner (uvicorn, SIGTERM drain, exit status) with `FakeEngine` (one word per
DELAY seconds, default 0.05) so the runner's behaviour is tested without a model; `--fail-load` makes
the engine loader raise like a broken model, which must end the process with status 1 and one line.
"""

from __future__ import annotations

import sys

from minigpt4_local.bundle import Bundle
from minigpt4_local.demo import demo_bundle_path
from minigpt4_local.errors import ModelDirError
from minigpt4_local.server.run import serve
from minigpt4_local.server.settings import ServerSettings
from minigpt4_local.tokenizer import load_tokenizer
from tests.support.fake_engine import FakeEngine


def main(argv: list[str]) -> int:
    port = int(argv[0])
    delay = float(argv[1]) if len(argv) > 1 and not argv[1].startswith("--") else 0.05
    bundle = Bundle.open(demo_bundle_path(), verify=False)
    tokenizer = load_tokenizer(bundle.part_path("tokenizer"))

    def open_engine() -> FakeEngine:
        if "--fail-load" in argv:
            raise ModelDirError("model path does not exist: /nowhere")
        return FakeEngine(bundle.config, tokenizer, token_delay=delay)

    return serve(
        ServerSettings(port=port, drain_timeout_s=20), open_engine, lambda line: print(line, file=sys.stderr)
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
