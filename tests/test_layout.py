"""The house: flows/ on top of tasks/ on top of worldpm/, read from the imports (ast), and one source of defaults."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from worldpm.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("worldpm", "tasks", "flows")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(f: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules `f` imports anywhere in its body (module level or inside a function)."""
    pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            # the module itself, or the deepest project module that contains the imported name
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(f, name, modules) for name, f in modules.items()}


def test_the_three_packages_exist_at_the_top():
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg
    assert not (ROOT / "worldpm" / "tasks").exists() and not (ROOT / "worldpm" / "flows").exists()


def test_worldpm_imports_neither_tasks_nor_flows_and_tasks_not_flows():
    bad = [(a, b) for a, deps in _graph().items() for b in deps
           if (a.split(".")[0] == "worldpm" and b.split(".")[0] in ("tasks", "flows"))
           or (a.split(".")[0] == "tasks" and b.split(".")[0] == "flows")]
    assert not bad, f"imports against the layers (worldpm < tasks < flows): {bad}"


def test_stages_never_import_each_other():
    g = _graph()
    stages = [m for m in g if m.startswith("tasks.")]
    assert len(stages) == 9
    bad = [(a, b) for a in stages for b in g[a] if b.startswith("tasks")]
    assert not bad, f"a stage imports another stage (or the registry): {bad}"


# worldpm's own floors, the ground first: an import may only run down (or stay on its floor)
FLOORS = ("worldpm.config", "worldpm.data", "worldpm.modeling", "worldpm.report")


def _floor(module: str) -> int | None:
    for i, f in enumerate(FLOORS):
        if module == f or module.startswith(f + "."):
            return i
    return None


def test_no_import_runs_back_up_the_library():
    bad = [(a, b) for a, deps in _graph().items() for b in deps
           if _floor(a) is not None and _floor(b) is not None and _floor(b) > _floor(a)]
    assert not bad, f"imports up the floors ({' < '.join(FLOORS)}): {bad}"


def test_no_import_circles():
    g = _graph()
    # a package's __init__ importing its own submodules is how a package hands names on: not a circle of files
    g = {a: {b for b in deps if not (a == b.rpartition(".")[0] and (_modules()[a].name == "__init__.py"))}
         for a, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, f"import circles: {cycles}"


def test_the_registry_is_the_dag():
    from tasks import PIPELINE

    assert PIPELINE.names == ("download", "normalise", "clean", "shard", "tokenize", "ref_logps", "train", "evaluate",
                              "plot")
    assert PIPELINE["clean"].upstream == ("normalise",) and PIPELINE["normalise"].upstream == ("download",)
    assert PIPELINE["plot"].upstream == ("clean", "train", "evaluate")
    assert PIPELINE.ancestors("train") == ["download", "normalise", "clean", "shard", "tokenize", "ref_logps"]
    assert PIPELINE.select(until="clean") == ([], ["download", "normalise", "clean"])
    assert PIPELINE.select(only="train") == (["download", "normalise", "clean", "shard", "tokenize", "ref_logps"],
                                             ["train"])


def test_builtin_defaults_are_pipeline_yaml():
    """A run without ./pipeline.yaml trains the same experiment as the shipped pipeline.yaml."""
    shipped = load_config(ROOT / "pipeline.yaml").model_dump(mode="json")
    builtin = PipelineConfig().model_dump(mode="json")
    shipped.pop("artifacts_dir"), builtin.pop("artifacts_dir")  # resolved against the file's folder
    assert shipped == builtin
    # and pipeline.yaml spells out what it sets (a value it shows differs from no default silently)
    raw = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    assert raw["artifacts_dir"] == PipelineConfig().artifacts_dir


def test_the_code_version_follows_what_a_stage_imports(tmp_path):
    """Editing a helper a stage imports (even lazily, inside a function) changes that stage's code version and
    only the versions of the stages that import it; editing a key-neutral module (errors) changes none."""
    for pkg in ("worldpm", "tasks"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import json, tasks; "
             "print(json.dumps({s.name: s.code_version for s in tasks.PIPELINE}))")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))

    def versions() -> dict[str, str]:
        import json

        out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    base = versions()
    # the column list of the data stages (train and evaluate read eval sets through the source adapters)
    with open(tmp_path / "worldpm" / "data" / "schema.py", "a") as f:
        f.write("\n# edited\n")
    after_schema = versions()
    assert {s for s in base if base[s] != after_schema[s]} == {"download", "normalise", "clean", "train", "evaluate"}
    with open(tmp_path / "worldpm" / "data" / "render.py", "a") as f:  # tokenize's layout, eval sets' too
        f.write("\n# edited\n")
    after_render = versions()
    assert {s for s in base if after_schema[s] != after_render[s]} == {"tokenize", "train", "evaluate"}
    with open(tmp_path / "worldpm" / "modeling" / "trainer" / "step.py", "a") as f:  # launched, not imported at top
        f.write("\n# edited\n")
    after_step = versions()
    assert {s for s in base if after_render[s] != after_step[s]} == {"train"}
    with open(tmp_path / "worldpm" / "errors.py", "a") as f:
        f.write("\n# edited\n")
    assert versions() == after_step
    # the import lists are memoised across processes (~/.cache/worldpm/imports.json): a new import in a file
    # is still seen by the next process, and it brings the imported file into the stage's version
    assert (tmp_path / "cache" / "worldpm" / "imports.json").is_file()
    with open(tmp_path / "worldpm" / "data" / "measures.py", "a") as f:  # not imported by plot so far
        f.write("\n# edited\n")
    after_measures = versions()
    assert after_measures["plot"] == after_step["plot"]
    with open(tmp_path / "tasks" / "plot.py", "a") as f:
        f.write("\n\ndef _late():\n    from worldpm.data import measures  # noqa: F401\n")
    after_import = versions()
    assert {s for s in base if after_measures[s] != after_import[s]} == {"plot"}
    with open(tmp_path / "worldpm" / "data" / "measures.py", "a") as f:
        f.write("\n# edited again\n")
    assert versions()["plot"] != after_import["plot"]


def test_a_stage_file_edited_during_a_run_keys_what_was_loaded(tmp_path):
    """A run keys a stage by the code it loaded: tasks/plot.py edited after the run imported it (a developer at
    work while a long training runs) leaves plot's version as loaded, so the old code's output is not stored under
    the new code's key. A module not imported yet (plot's figures, imported when plot runs) is read from disk."""
    for pkg in ("worldpm", "tasks"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))

    def plot_version(edit_after_import: str | None = None) -> str:
        """plot's code version in a new process; `edit_after_import`: a file appended to after `import tasks`."""
        edit = f"open({edit_after_import!r}, 'a').write('\\n# edited during the run\\n')\n" if edit_after_import \
            else ""
        code = f"import tasks\n{edit}print(tasks.PIPELINE['plot'].code_version)\n"
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout
        return out.strip().splitlines()[-1]

    base = plot_version()
    assert plot_version("tasks/plot.py") == base  # loaded before the edit: keyed as loaded
    edited = plot_version()
    assert edited != base  # a new process loads the edited file
    assert plot_version("worldpm/report/figures.py") != edited  # not loaded yet: what runs is what is on disk
