"""The `worldpm` console script: worldpm/cli.py's commands over this project's stages (tasks.PIPELINE), the Prefect
flow (flows/worldpm.py) and the deployment commands `serve` and `server` (flows/deploy.py)."""
from __future__ import annotations

import sys

from flows import deploy
from tasks import PIPELINE
from worldpm import cli
from worldpm.errors import StageError


def run_flow(**params) -> list[dict]:
    """The flow `worldpm`, imported when a run starts (Prefect takes seconds to import; `status` does not need it)."""
    from flows.worldpm import worldpm

    try:
        return worldpm(**params)
    except RuntimeError as e:  # Prefect's own, with a traceback: the API is down or the URL is wrong
        if not str(e).startswith("Failed to reach API"):
            raise
        from prefect.settings import get_current_settings

        raise StageError(f"cannot reach the Prefect API at {get_current_settings().api.url} (PREFECT_API_URL): start "
                         "the server (`worldpm server` or `prefect server start`), or unset PREFECT_API_URL to run "
                         "with a temporary one") from None


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, pipeline=PIPELINE, run_flow=run_flow, commands=(deploy.register,))


if __name__ == "__main__":
    sys.exit(main())
