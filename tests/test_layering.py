"""The house's import rules: the core (`mllmrec_ray/`) imports neither Ray nor the rooms above it.

`jobs/` (entrypoints, the CLI) and `actors/` (Ray actors) import the core, never the reverse,
not even through `importlib.import_module("jobs....")`. Read from the source with `ast`, so a
lazy import inside a function counts too.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("jobs", "actors", "ray")


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement and every literal import_module("...") call."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def test_imported_names_sees_every_kind_of_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import ray\nfrom jobs.cli import main\ndef f():\n    import importlib\n"
                 "    return importlib.import_module('actors.learner')\n")
    assert [m for _, m in imported_names(f)] == ["ray", "jobs.cli", "importlib", "actors.learner"]


def test_core_imports_neither_ray_nor_jobs_nor_actors():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}"
           for p in sorted((REPO / "mllmrec_ray").rglob("*.py"))
           for line, mod in imported_names(p)
           if mod.split(".")[0] in FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_cli_lives_in_jobs():
    assert not (REPO / "mllmrec_ray" / "cli.py").exists()
    text = (REPO / "pyproject.toml").read_text()
    assert 'mllmrec = "jobs.cli:main"' in text


def test_no_function_over_100_lines():
    """Long functions hide steps that deserve names (issue 12); nested functions count in their parent."""
    long = []
    for folder in ("mllmrec_ray", "actors", "jobs", "benchmarks", "tests"):
        for p in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 100:
                        long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_readme_layout_names_every_core_package_and_top_level_folder():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):].split("```")[1]
    core = sorted(p.name for p in (REPO / "mllmrec_ray").iterdir()
                  if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py"))
    missing = [name for name in core if f"  {name.removesuffix('.py')}" not in layout]
    missing += [d for d in ("mllmrec_ray", "actors", "jobs", "configs", "cluster", "benchmarks", "tests", "docs")
                if f"{d}/" not in layout]
    assert not missing, f"README layout misses {missing}"
