"""The `worldpm` console script: worldpm/cli.py's commands over this project's stages (tasks.PIPELINE), the Prefect
flow (flows/worldpm.py) run against a reused Prefect server (flows/server.py), the deployment commands `serve`
and `server` (flows/deploy.py), and `train-node` (worldpm/modeling/trainer/nodes.py: another machine's part in a
training run)."""
from __future__ import annotations

import sys

from flows import deploy
from tasks import PIPELINE
from worldpm import cli
from worldpm.errors import StageError
from worldpm.modeling.trainer import nodes


def run_flow(**params) -> list[dict]:
    """The flow `worldpm`, imported when a run starts (Prefect takes seconds to import; `status` does not need it),
    against the user's PREFECT_API_URL or the project's background server (flows/server.py), started once."""
    from flows import server

    url = server.api_for_run()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.worldpm import worldpm

    try:
        if url is None:  # the user's own server, or Prefect's temporary one
            return worldpm(**params)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            return worldpm(**params)
    except RuntimeError as e:  # Prefect's own, with a traceback: the API is down or the URL is wrong
        if not str(e).startswith("Failed to reach API"):
            raise
        from prefect.settings import get_current_settings

        if url is not None:  # ours, gone during the run (stopped, killed)
            raise StageError(f"cannot reach the background Prefect server at {url} any more (stopped during the "
                             "run?): `worldpm server status` says what runs; the next run starts it again") from None
        raise StageError(f"cannot reach the Prefect API at {get_current_settings().api.url} (PREFECT_API_URL): start "
                         "the server (`worldpm server` or `prefect server start`), or unset PREFECT_API_URL to let "
                         "worldpm start one in the background") from None


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, pipeline=PIPELINE, run_flow=run_flow, commands=(deploy.register, nodes.register))


if __name__ == "__main__":
    sys.exit(main())
