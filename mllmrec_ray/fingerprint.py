"""Stage fingerprints: what each pipeline stage's output was made from, and what must rerun.

A stage's *settings* are its command line (paths inside the run directory written as
`<run>`, so they only locate outputs) and the resolved config keys the stage reads
(`STAGE_READS`). Its *fingerprint* hashes those settings together with the fingerprints
of every stage upstream of it (`DEPENDENCIES`). `mllmrec pipeline` writes a record
(`runs/<name>/fingerprints/<stage>.json`) only after the stage succeeded; each record
also carries a `run_id` per completion and the `run_id`s of the upstream outputs it
consumed, so a stage rerun upstream (even with the same settings, e.g. `--force`) makes
everything downstream stale.

A stage runs when it is forced, its output is missing, it has no record (e.g. made
before fingerprints existed: it is rerun, never assumed current), its settings differ
from the record, or something upstream runs now or ran since. Pure logic, no Ray.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

RUN_TOKEN = "<run>"
RECORD_DIR = "fingerprints"

# Keys no stage output depends on: where the run lives and how many logical CPUs Ray advertises.
IGNORED_KEYS = ("name", "runs_dir", "ray_num_cpus")

# Stage I parallelism: the part stores key rows by (input, model, prompt version), never by the pool,
# so pool size, batch size and actor resources do not change what a Stage I stage writes.
_STAGE1_EXECUTION = ("stage1.pool_size", "stage1.batch_size", "stage1.resources")

# stage -> (config keys it reads, keys among those it ignores), as dotted prefixes or fnmatch patterns.
# Keys a stage gets through its command line (baselines: split, candidates, seed, ...) are covered by
# the argv part of its settings. A stage missing here reads the whole config but `serve` and
# `eval.models` (conservative: it reruns on any other change); add new stages here.
STAGE_READS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("data",), ()),
    "pop": ((), ()),
    "sasrec": ((), ()),
    "sasrec-full": ((), ()),
    "random": ((), ()),
    "min-id": ((), ()),
    "collab": ((), ()),
    "seqrec": ((), ()),
    "textualize": (("stage1.captioner*", "model.engine"), ()),
    "cot": (("stage1", "model.name", "model.engine", "data.seed"),
            (*_STAGE1_EXECUTION, "stage1.captioner*", "stage1.embedder", "stage1.p_sft", "stage1.p_grpo")),
    "mda": (("stage1.embedder", "stage1.p_sft", "stage1.p_grpo", "stage1.cot_source", "stage1.mda*"), ()),
    # checkpoint cadence decides where a run can resume, never what it writes
    "sft": (("sft", "model.name", "model.lora", "model.save_dtype", "prompt", "stage1.cot_source"),
            ("sft.checkpoint_every",)),
    "grpo": (("grpo", "model", "prompt", "stage1.cot_source"), ("grpo.checkpoint_every", "grpo.keep_checkpoints")),
    # eval.workers: how many scorers share the samples, not how a sample is scored
    "eval-*": (("eval", "prompt", "model.engine"), ("eval.models", "eval.workers")),
    "report": ((), ()),
}
_DEFAULT_READS: tuple[tuple[str, ...], tuple[str, ...]] = (("*",), ("serve", "eval.models"))

# The dependency graph: stage -> the stages whose outputs it reads directly (when they are planned).
# Baselines read the prepared data only; the LLM chain is prepare -> textualize -> cot -> mda -> sft
# -> grpo; an evaluation reads its model (and the captions when prompts carry them); the report
# reads everything. A stage missing here depends on every stage planned before it.
DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "pop": ("prepare",),
    "sasrec": ("prepare", "seqrec"),  # with prompt.collab_seq it is the seqrec stage's full model
    "sasrec-full": ("prepare",),
    "random": ("prepare",),
    "min-id": ("prepare",),
    "collab": ("prepare",),
    "textualize": ("prepare",),
    "cot": ("prepare", "textualize"),
    "mda": ("prepare", "textualize", "cot"),
    "seqrec": ("prepare",),
    "sft": ("prepare", "seqrec", "textualize", "cot", "mda"),
    "grpo": ("prepare", "seqrec", "textualize", "mda", "sft"),
    "eval-base": ("prepare", "seqrec"),
    "eval-sft": ("prepare", "seqrec", "sft"),
    "eval-grpo": ("prepare", "seqrec", "sft", "grpo"),
}
# evaluations whose prompts carry captions also read textualize's output
_CAPTION_READERS = ("eval-*",)


# ----------------------------------------------------------------------------- settings


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty mappings stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _matches(key: str, pattern: str) -> bool:
    return key == pattern or key.startswith(pattern + ".") or fnmatch.fnmatchcase(key, pattern)


def _reads(stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if stage in STAGE_READS:
        return STAGE_READS[stage]
    for pattern, reads in STAGE_READS.items():
        if fnmatch.fnmatchcase(stage, pattern):
            return reads
    return _DEFAULT_READS


def _read_by(stage: str, key: str) -> bool:
    include, exclude = _reads(stage)
    return any(_matches(key, p) for p in include) and not any(_matches(key, p) for p in (*exclude, *IGNORED_KEYS))


def config_keys_read(stage: str, config: dict) -> dict[str, Any]:
    """The resolved config's keys (dotted) that `stage` reads, with their values."""
    return {k: v for k, v in sorted(flatten(config).items()) if _read_by(stage, k)}


def normalize_argv(argv: Iterable[str], run_dir: str | Path) -> list[str]:
    """Paths inside the run directory only locate outputs: written relative to `<run>`."""
    root = str(Path(run_dir))
    out = []
    for a in map(str, argv):
        if a == root:
            a = RUN_TOKEN
        elif a.startswith(root + "/"):
            a = RUN_TOKEN + a[len(root):]
        out.append(a)
    return out


def stage_settings(stage: str, argv: list[str], config: dict, run_dir: str | Path) -> dict:
    """What a stage's output depends on besides its inputs, in the JSON form it is recorded in
    (tuples become lists, paths strings), so a record read back compares equal."""
    settings = {"argv": normalize_argv(argv, run_dir), "config": config_keys_read(stage, config)}
    return json.loads(json.dumps(settings, default=str))


def dependencies(names: list[str], with_captions: bool) -> dict[str, list[str]]:
    """stage -> all its planned ancestors (transitive), in plan order."""
    planned = set(names)
    direct: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        if name in DEPENDENCIES:
            deps = list(DEPENDENCIES[name])
        else:
            deps = list(names[:i])  # the report, and stages the graph does not know: everything before
        if with_captions and any(fnmatch.fnmatchcase(name, p) for p in _CAPTION_READERS):
            deps.append("textualize")
        direct[name] = [d for d in deps if d in planned and d != name]
    out: dict[str, list[str]] = {}
    for name in names:
        seen: set[str] = set()
        todo = list(direct[name])
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo.extend(direct.get(d, []))
        out[name] = [n for n in names if n in seen]
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(settings: dict, upstream: dict[str, str]) -> str:
    """Hash of a stage's settings and its upstream stages' fingerprints."""
    return _hash({"settings": settings, "upstream": dict(sorted(upstream.items()))})


def _short(v: Any, limit: int = 40) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= limit else s[: limit - 3] + "..."


def settings_diff(old: dict, new: dict, limit: int = 3) -> list[str]:
    """Human-readable differences between two settings dicts (config keys, then the command line)."""
    changes = []
    oc, nc = old.get("config", {}), new.get("config", {})
    for k in sorted(set(oc) | set(nc)):
        if oc.get(k, "<unset>") != nc.get(k, "<unset>"):
            changes.append(f"{k} {_short(oc.get(k, '<unset>'))} -> {_short(nc.get(k, '<unset>'))}")
    oa, na = old.get("argv", []), new.get("argv", [])
    if oa != na:
        if len(oa) == len(na):
            for i, (a, b) in enumerate(zip(oa, na)):
                if a != b:
                    opt = na[i - 1] if i and na[i - 1].startswith("--") else f"argument {i + 1}"
                    changes.append(f"{opt} {_short(a)} -> {_short(b)}")
        else:
            added = [a for a in na if a.startswith("--") and a not in oa]
            removed = [a for a in oa if a.startswith("--") and a not in na]
            changes.append("command line " + ", ".join([*(f"+{a}" for a in added), *(f"-{a}" for a in removed)]
                                                       or ["changed"]))
    if len(changes) > limit:
        changes = changes[:limit] + [f"+{len(changes) - limit} more"]
    return changes


# ----------------------------------------------------------------------------- records


def record_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD_DIR


def record_path(run_dir: str | Path, stage: str) -> Path:
    return record_dir(run_dir) / f"{stage}.json"


def attempt_path(run_dir: str | Path, stage: str) -> Path:
    """Written when a stage starts, removed when it is recorded: what an interrupted attempt ran with."""
    return record_dir(run_dir) / f"{stage}.attempt.json"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or torn / unreadable: treated as no record (the stage reruns)
    return data if isinstance(data, dict) else None


def read_records(run_dir: str | Path, names: Iterable[str]) -> dict[str, dict | None]:
    return {n: _read(record_path(run_dir, n)) for n in names}


def read_attempt(run_dir: str | Path, stage: str) -> dict | None:
    return _read(attempt_path(run_dir, stage))


def upstream_state(ancestors: list[str], records: dict[str, dict | None]) -> dict[str, dict]:
    """What a stage consumes from upstream now: each ancestor's fingerprint and run_id."""
    return {a: {"fingerprint": (records.get(a) or {}).get("fingerprint"),
                "run_id": (records.get(a) or {}).get("run_id")} for a in ancestors}


def attempt_for(stage: str, settings: dict, ancestors: list[str], records: dict[str, dict | None]) -> dict:
    up = upstream_state(ancestors, records)
    return {"stage": stage, "settings": settings, "upstream": up,
            "fingerprint": fingerprint(settings, {a: u["fingerprint"] or "" for a, u in up.items()})}


def make_record(attempt: dict, seconds: float | None = None) -> dict:
    """The record of a finished attempt: its fingerprint plus a fresh run_id for downstream stages."""
    return {**attempt, "run_id": uuid.uuid4().hex[:16],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"seconds": round(seconds, 1)} if seconds is not None else {})}


# Switches added after runs were recorded, at the value that reproduces those runs: left out
# of the comparison like a key at None, so an old record still matches a config that leaves them off.
OFF_VALUES: dict[str, Any] = {"prompt.collab_seq": False, "prompt.evidence_style": "words",
                              "prompt.instructions": "full", "grpo.action": "generate", "grpo.rank_k": 3,
                              "grpo.rank_teacher": 0.0}


def comparable(settings: dict | None, stage: str) -> dict:
    """Settings as compared: config keys at None (or at their OFF_VALUES value) left out (an optional
    feature left off, as before the key existed) and keys the stage no longer reads dropped, so a
    record made before a key was added, or before one was declared irrelevant (checkpoint cadence),
    still matches."""
    settings = settings or {}
    config = settings.get("config") or {}
    return {**settings, "config": {k: v for k, v in config.items() if v is not None and _read_by(stage, k)
                                   and not (k in OFF_VALUES and v == OFF_VALUES[k])}}


# Keys a resumable stage may raise and still continue from its checkpoint: GRPO's learning rate is
# constant and its sampling seeds are per step, so a run to N steps is the prefix of a run to M > N.
EXTENDABLE = {"grpo": ("grpo.steps",)}


def extends(old: dict | None, new: dict) -> tuple[str, ...]:
    """The EXTENDABLE keys `new` raises over `old` (a finished record or an interrupted attempt) when it
    otherwise has the same settings and upstream outputs; () when it does not continue `old`."""
    stage = new.get("stage", "")
    keys = EXTENDABLE.get(stage, ())
    if not old or not keys or old.get("upstream") != new["upstream"]:
        return ()
    a, b = comparable(old.get("settings"), stage), comparable(new["settings"], stage)
    ca, cb = a.pop("config"), b.pop("config")
    if a != b or {k: v for k, v in ca.items() if k not in keys} != {k: v for k, v in cb.items() if k not in keys}:
        return ()
    if any(k not in ca or k not in cb or cb[k] < ca[k] for k in keys):
        return ()
    return tuple(k for k in keys if cb[k] != ca[k])


def same_inputs(a: dict | None, b: dict) -> bool:
    """Two attempts (or a record and an attempt) were made from the same settings and upstream outputs."""
    stage = b.get("stage", "")
    return (bool(a) and comparable(a.get("settings"), stage) == comparable(b["settings"], stage)
            and a.get("upstream") == b["upstream"])


# ----------------------------------------------------------------------------- decisions


@dataclass
class StageState:
    name: str
    settings: dict
    ancestors: list[str] = field(default_factory=list)
    has_marker: bool = True        # False: the stage always runs (the report)
    output_exists: bool = False


@dataclass
class Decision:
    name: str
    run: bool
    reason: str

    def line(self) -> str:
        return f"{self.name}: {'run' if self.run else 'skip'} ({self.reason})"


def decide(states: list[StageState], records: dict[str, dict | None],
           only: set[str] | None = None, force: set[str] | None = None) -> list[Decision]:
    """Run or skip, with the reason, for every stage in plan order."""
    force = force or set()
    runs: set[str] = set()
    out = []
    for s in states:
        run, reason = _decide_one(s, records, only, force, runs)
        if run:
            runs.add(s.name)
        out.append(Decision(s.name, run, reason))
    return out


def _decide_one(s: StageState, records, only, force, runs) -> tuple[bool, str]:
    if only is not None and s.name not in only:
        return False, "not in --only"
    if s.name in force:
        return True, "forced"
    if not s.has_marker:
        return True, "always rebuilt from the stage outputs"
    if not s.output_exists:
        return True, "output missing"
    rec = records.get(s.name)
    if not rec:
        return True, "no fingerprint recorded"
    old, new = comparable(rec.get("settings"), s.name), comparable(s.settings, s.name)
    if old != new:
        return True, "settings changed: " + ", ".join(settings_diff(old, new))
    rerun = [a for a in s.ancestors if a in runs]
    if rerun:
        return True, f"upstream {', '.join(rerun)} {'reruns' if len(rerun) == 1 else 'rerun'}"
    seen = rec.get("upstream") or {}
    for a in s.ancestors:
        cur = records.get(a)
        if not cur:
            return True, f"upstream {a} has no fingerprint"
        if (seen.get(a) or {}).get("run_id") != cur.get("run_id"):
            changed = (seen.get(a) or {}).get("fingerprint") != cur.get("fingerprint")
            return True, f"upstream {a} {'changed' if changed else 'was rerun'} since"
    return False, "up to date"
