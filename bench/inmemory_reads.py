"""bench_scale's baseline for the trainer: each split read into the process's memory from <split>.parquet
(trainer.data.load_pairs), the way the trainer read it before the token store. Named in train.callbacks
(`inmemory_reads:InMemory`, with bench/ on PYTHONPATH): importing this module, which every trainer process does
before its setup, replaces the recipe's mapped read. Never used by the pipeline itself."""
from __future__ import annotations

import sys
from pathlib import Path

from worldpm.modeling.trainer import recipe
from worldpm.modeling.trainer.data import load_pairs


def read_in_memory(data_dir, split: str, ref_dir=None):
    ref = None if ref_dir is None else Path(ref_dir) / f"{split}.parquet"
    return load_pairs(Path(data_dir) / f"{split}.parquet", ref_path=ref)


# the launched trainer runs recipe.py as __main__ (`python -m worldpm.modeling.trainer.recipe`): patch that module,
# and the imported one for a recipe run in process
for module in (recipe, sys.modules.get("__main__")):
    if module is not None and hasattr(module, "read_split_pairs"):
        module.read_split_pairs = read_in_memory


class InMemory(recipe.Callback):
    """Naming it is what imports this module; it says which read the run used."""

    def on_train_start(self, r):
        r.say(f"bench: splits read in memory ({type(r.data).__name__}, mapped={r.data.mapped})")
