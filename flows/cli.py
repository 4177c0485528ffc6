"""The `worldpm` console script: worldpm/cli.py's commands over this project's stages (tasks.PIPELINE), the Prefect
flow (flows/worldpm.py) and the deployment commands `serve` and `server` (flows/deploy.py)."""
from __future__ import annotations

import sys

from flows import deploy
from tasks import PIPELINE
from worldpm import cli


def run_flow(**params) -> list[dict]:
    """The flow `worldpm`, imported when a run starts (Prefect takes seconds to import; `status` does not need it)."""
    from flows.worldpm import worldpm

    return worldpm(**params)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, pipeline=PIPELINE, run_flow=run_flow, commands=(deploy.register,))


if __name__ == "__main__":
    sys.exit(main())
