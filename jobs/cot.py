"""`mllmrec cot`: pseudo-CoT, refined CoT, sanitising, leakage check and judge audit (paper Eq. 4-5, App. D).

Usage: mllmrec cot --data DIR --stage1 DIR [--config YAML] [--model NAME] [--max-samples N]
                   [--refiner local|openai] [--refiner-model NAME] [--endpoint URL]
                   [--judge-samples N] [--pool-size N] [--batch-size N] [--num-cpus X]

For the (capped) training samples: a pseudo-CoT from the history only (titles + cover
captions, or cover images for a VLM with --with-images), masked against the sample's
target and candidates; then a refined `Step 1..Step 4` CoT from history titles +
captions + the masked pseudo-CoT (never the target), masked again. Every generation
runs on a Ray Data actor pool and is stored per batch under STAGE1/parts/, so a rerun
only generates what is missing. Writes STAGE1/cot.parquet and STAGE1/audit.json
(leakage check over every CoT + judge scores on a sample).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.stage1_common import add_common_arguments

    parser.add_argument("--data", required=True, help="prepared data dir (samples.parquet, items.parquet)")
    parser.add_argument("--stage1", required=True, help="Stage I dir (captions.parquet in, cot.parquet out)")
    parser.add_argument("--model", help="pseudo-CoT generator (default: stage1.cot_model, else model.name)")
    parser.add_argument("--refiner", choices=["local", "openai"], help="default: stage1.refiner")
    parser.add_argument("--refiner-model", help="default: stage1.refiner_model, else the pseudo-CoT model")
    parser.add_argument("--endpoint", help="OpenAI-compatible base URL for --refiner openai (e.g. http://HOST/v1)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var holding the endpoint's key")
    parser.add_argument("--requests-per-second", type=float, default=2.0, help="endpoint rate limit per actor")
    parser.add_argument("--max-samples", type=int, help="CoT for at most N training samples (stage1.max_cot_samples)")
    parser.add_argument("--max-new-tokens", type=int, default=224, help="pseudo-CoT and refined CoT length cap")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="engine context for Stage I (at least model.engine.max_model_len); longer prompts "
                             "are recorded as prompt_too_long")
    parser.add_argument("--with-images", action="store_true",
                        help="give the pseudo-CoT model the cover images (it must be a VLM)")
    parser.add_argument("--judge-samples", type=int, help="CoTs per source scored by the judge (0: none; default "
                        "stage1.judge_samples)")
    parser.add_argument("--judge-model", help="judge model (default: the refiner model, same backend)")
    parser.add_argument("--judge-retries", type=int, default=2, help="re-asks for an invalid judge reply")
    parser.add_argument("--judge-max-new-tokens", type=int, default=512)
    parser.add_argument("--no-judge-guided", action="store_true",
                        help="local judge without JSON-schema constrained decoding")
    add_common_arguments(parser)


def _pick(samples: list[dict], n: int | None, seed: int) -> list[dict]:
    """The first n of a seeded permutation (all when n is None or large), in sample_id order.

    A smaller n picks a subset of a larger n's samples, so changing the cap reuses finished rows.
    """
    import numpy as np

    samples = sorted(samples, key=lambda s: s["sample_id"])
    if n is None or n >= len(samples):
        return samples
    idx = np.random.default_rng(seed).permutation(len(samples))[:n]
    return [samples[i] for i in sorted(idx)]


def leakage_report(cot_rows: list[dict], samples: dict[str, dict], items: dict[str, dict]) -> dict:
    """Exact-match leakage check over every stored CoT: target id tags / title forms and candidate id tags."""
    from mllmrec_ray.prompting.parsing import mentions_item

    report = {"target_mentions": 0, "candidate_id_mentions": 0, "non_train_samples_with_cot": 0, "texts_checked": 0,
              "offending": []}
    for r in cot_rows:
        s = samples[r["sample_id"]]
        if s["split"] != "train":
            report["non_train_samples_with_cot"] += 1
        target = s["target"]
        for col in ("pseudo_cot", "refined_cot"):
            text = r.get(col)
            if not text:
                continue
            report["texts_checked"] += 1
            if mentions_item(text, target, items[target]["title"]):
                report["target_mentions"] += 1
                report["offending"].append([r["sample_id"], col, "target"])
            cands = [c for c in list(s["candidates"]) + list(s.get("candidates_100") or []) if c != target]
            if any(mentions_item(text, c, None) for c in cands):
                report["candidate_id_mentions"] += 1
                report["offending"].append([r["sample_id"], col, "candidate id"])
    report["clean"] = not report["offending"] and report["non_train_samples_with_cot"] == 0
    return report


class CotRun:
    """One `mllmrec cot` run, as steps: pseudo-CoT, refinement, cot.parquet (leakage-checked), judge,
    audit. Each generation step runs only its missing rows (PartStore) on a Ray Data actor pool."""

    def __init__(self, args: argparse.Namespace):
        import pyarrow.parquet as pq

        from jobs.stage1_common import engine_dict, load_cfg
        from mllmrec_ray.data.run_data import load_items

        self.args = args
        self.cfg = cfg = load_cfg(args)
        if args.judge_samples is None:
            args.judge_samples = cfg.stage1.judge_samples
        self.s1 = s1 = cfg.stage1
        data, self.stage1 = Path(args.data), Path(args.stage1)
        captions_path = self.stage1 / "captions.parquet"
        self.items = load_items(data, captions_path)
        self.has_captions = any(it["caption"] for it in self.items.values())
        if not self.has_captions:
            print(f"[cot] no captions in {captions_path}: CoT prompts use titles only", flush=True)
        self.all_samples = {r["sample_id"]: r for r in pq.read_table(data / "samples.parquet").to_pylist()}
        train = [s for s in self.all_samples.values() if s["split"] == "train"]
        cap = args.max_samples if args.max_samples is not None else s1.max_cot_samples
        self.samples = _pick(train, cap, cfg.data.seed)
        # Only the storing step sees these (to mask mentions); no prompt builder or generator gets them.
        self.targets = {s["sample_id"]: (s["target"], self.items[s["target"]].get("title"),
                                         list(s["candidates"]) + list(s.get("candidates_100") or []))
                        for s in self.samples}
        self.gen_model = args.model or s1.cot_model or cfg.model.name
        self.refiner = args.refiner or s1.refiner
        self.refiner_model = args.refiner_model or s1.refiner_model or (self.gen_model if self.refiner == "local" else None)
        self.endpoint = args.endpoint or s1.refiner_endpoint
        if self.refiner == "openai" and not (self.endpoint and self.refiner_model):
            raise SystemExit("--refiner openai needs --endpoint URL and --refiner-model NAME (or stage1.* in the config)")
        self.engine = engine_dict(cfg.model.engine, min_model_len=args.max_model_len)
        self.sampling = {"temperature": args.temperature, "top_p": 0.9, "max_tokens": args.max_new_tokens}
        self.settings = f"t={args.temperature}|max={args.max_new_tokens}"
        self.ray_started = False
        self.timings: dict[str, dict] = {}
        print(f"[cot] {len(self.samples)} of {len(train)} training samples; pseudo-CoT by {self.gen_model}, "
              f"refiner {self.refiner}:{self.refiner_model}; cot_source={s1.cot_source}, "
              f"refine_with_pseudo_cot={s1.refine_with_pseudo_cot}, refine_with_captions={s1.refine_with_captions}",
              flush=True)

    def history(self, s: dict, captions: bool) -> list[dict]:
        items = self.items
        return [{"title": items[i].get("title"), "year": items[i].get("year"),
                 "caption": items[i].get("caption") if captions else None,
                 "image_path": items[i].get("image_path")} for i in s["history"]]

    def generate(self, step: str, rows: list[dict], fn, fn_kwargs: dict, model: str, version: str,
                 sanitize: bool = True) -> dict[str, dict]:
        """Run the missing rows of one step; return key -> stored row for every row finished."""
        from jobs.stage1_common import run_pool, start_ray
        from mllmrec_ray.stage1.store import PartStore

        store = PartStore(self.stage1 / "parts" / step)
        done = store.finished_keys()
        todo = [r for r in rows if r["key"] not in done]
        print(f"[{step}] {len(rows)} rows, {len(rows) - len(todo)} already finished, {len(todo)} to generate",
              flush=True)
        if todo and not self.ray_started:
            start_ray(self.cfg, self.args)
            self.ray_started = True
        timings = self.timings
        timings[step] = run_pool(todo, fn, fn_kwargs, store.root, self.s1, desc=step,
                                 targets=self.targets if sanitize else None,
                                 constants={"model": model, "prompt_version": version})
        table = store.select([r["key"] for r in rows])
        finished = {r["key"]: r for r in (table.to_pylist() if table is not None else [])}
        if todo:  # engine time vs wall time (wall includes Ray start-up and engine load)
            new = [finished[r["key"]] for r in todo if r["key"] in finished]
            engine_s = sum({r["batch"]: r.get("batch_seconds") or 0.0 for r in new}.values())
            tokens = sum(r.get("completion_tokens") or 0 for r in new)
            timings[step].update({"completion_tokens": tokens, "engine_seconds": round(engine_s, 2),
                                  "tokens_per_engine_s": round(tokens / engine_s, 1) if engine_s else None,
                                  "torch_threads": sorted({r["torch_threads"] for r in new
                                                           if r.get("torch_threads") is not None})})
        return finished

    def local(self, model: str, **extra) -> tuple:
        from actors.cot_generator import LocalGenerator

        return LocalGenerator, {"model": model, "engine": self.engine, "sampling": self.sampling, **extra}

    def refiner_fn(self, **extra) -> tuple:
        from actors.cot_generator import OpenAIGenerator

        if self.refiner == "local":
            return self.local(self.refiner_model, **extra)
        args = self.args
        return OpenAIGenerator, {"endpoint": self.endpoint, "model": self.refiner_model,
                                 "cache_dir": str(self.stage1 / "cache" / "openai"),
                                 "requests_per_second": args.requests_per_second, "api_key_env": args.api_key_env,
                                 "sampling": {**self.sampling, "max_tokens": max(1024, args.max_new_tokens)}, **extra}

    def pseudo(self) -> dict[str, dict]:
        """Pseudo-CoT (Eq. 4) from the history only: sample_id -> stored row."""
        from mllmrec_ray.stage1 import cot_prompts as P
        from mllmrec_ray.stage1.store import content_hash, row_key

        s1, args, samples = self.s1, self.args, self.samples
        if not (s1.cot_source == "pseudo" or s1.refine_with_pseudo_cot):
            return {}
        version = f"{P.PSEUDO_VERSION}|{self.settings}|images={args.with_images}"
        rows = []
        for s in samples:
            msgs = json.dumps(P.pseudo_cot_messages(self.history(s, self.has_captions), with_captions=self.has_captions,
                                                    with_images=args.with_images), sort_keys=True)
            rows.append({"key": row_key("pseudo", s["sample_id"], content_hash(msgs), self.gen_model, version),
                         "sample_id": s["sample_id"], "messages": msgs})
        fn, kw = self.local(self.gen_model, max_images=len(samples[0]["history"]) if args.with_images and samples else 0)
        done = self.generate("pseudo", rows, fn, kw, self.gen_model, version)
        return {r["sample_id"]: done[r["key"]] for r in rows if r["key"] in done}

    def refine(self, pseudo: dict[str, dict]) -> dict[str, dict]:
        """Refinement (Eq. 5): history titles (+ captions) + masked pseudo-CoT, never the target."""
        from mllmrec_ray.stage1 import cot_prompts as P
        from mllmrec_ray.stage1.store import content_hash, row_key

        s1 = self.s1
        if s1.cot_source != "refined":
            return {}
        version = f"{P.REFINE_VERSION}|{self.settings}|{self.refiner}"
        rows = []
        for s in self.samples:
            draft = (pseudo.get(s["sample_id"]) or {}).get("cot") if s1.refine_with_pseudo_cot else None
            if s1.refine_with_pseudo_cot and not draft:
                continue  # pseudo-CoT empty or dropped: nothing to refine
            with_caps = self.has_captions and s1.refine_with_captions
            msgs = json.dumps(P.refine_messages(self.history(s, with_caps), draft, with_captions=with_caps),
                              sort_keys=True)
            rows.append({"key": row_key("refined", s["sample_id"], content_hash(msgs), self.refiner_model, version),
                         "sample_id": s["sample_id"], "messages": msgs})
        fn, kw = self.refiner_fn()
        done = self.generate("refined", rows, fn, kw, self.refiner_model, version)
        return {r["sample_id"]: done[r["key"]] for r in rows if r["key"] in done}

    def cot_table(self, pseudo: dict[str, dict], refined: dict[str, dict]):
        """(cot.parquet's table joined by sample_id, its rows, the leakage report)."""
        import pyarrow as pa

        from mllmrec_ray.stage1 import cot_prompts as P

        def col(d: dict, sid: str, name: str):
            return (d.get(sid) or {}).get(name)

        sids = [s["sample_id"] for s in self.samples]
        refined_source = self.s1.cot_source == "refined"
        profiles = [P.step4_profile(col(refined, sid, "cot") if refined_source else col(pseudo, sid, "cot"))
                    for sid in sids]
        table = pa.table({
            "sample_id": pa.array(sids, pa.string()),
            "pseudo_cot": pa.array([col(pseudo, sid, "cot") for sid in sids], pa.string()),
            "refined_cot": pa.array([col(refined, sid, "cot") for sid in sids], pa.string()),
            "pseudo_masks": pa.array([col(pseudo, sid, "n_masks") or 0 for sid in sids], pa.int32()),
            "refined_masks": pa.array([col(refined, sid, "n_masks") or 0 for sid in sids], pa.int32()),
            "pseudo_dropped": pa.array([bool(col(pseudo, sid, "dropped")) for sid in sids], pa.bool_()),
            "refined_dropped": pa.array([bool(col(refined, sid, "dropped")) for sid in sids], pa.bool_()),
            "pseudo_tokens": pa.array([col(pseudo, sid, "completion_tokens") for sid in sids], pa.int32()),
            "refined_tokens": pa.array([col(refined, sid, "completion_tokens") for sid in sids], pa.int32()),
            "step4_profile": pa.array(profiles, pa.string()),
            "cot_model": pa.array([self.gen_model if sid in pseudo else None for sid in sids], pa.string()),
            "refiner_model": pa.array([f"{self.refiner}:{self.refiner_model}" if sid in refined else None
                                       for sid in sids], pa.string()),
        })
        cot_rows = table.to_pylist()
        leakage = leakage_report(cot_rows, self.all_samples, self.items)
        leakage.update({
            "samples": len(sids),
            "pseudo_cots": sum(r["pseudo_cot"] is not None for r in cot_rows),
            "refined_cots": sum(r["refined_cot"] is not None for r in cot_rows),
            "pseudo_masks_total": sum(r["pseudo_masks"] for r in cot_rows),
            "refined_masks_total": sum(r["refined_masks"] for r in cot_rows),
            "pseudo_samples_masked": sum(r["pseudo_masks"] > 0 for r in cot_rows),
            "refined_samples_masked": sum(r["refined_masks"] > 0 for r in cot_rows),
            "pseudo_dropped": sum(r["pseudo_dropped"] for r in cot_rows),
            "refined_dropped": sum(r["refined_dropped"] for r in cot_rows),
            "with_step4_profile": sum(p is not None for p in profiles),
        })
        return table, cot_rows, leakage

    def judge(self, cot_rows: list[dict]) -> dict:
        """Judge (Appendix D) on a seeded sample of each source; the audit's `judge` block."""
        import numpy as np

        from mllmrec_ray.stage1 import cot_prompts as P
        from mllmrec_ray.stage1.store import content_hash, row_key

        args = self.args
        judge = {"samples_per_source": args.judge_samples}
        if args.judge_samples <= 0:
            return judge
        judge_model = args.judge_model or self.refiner_model
        rng = np.random.default_rng(self.cfg.data.seed + 1)
        rows = []
        for source in ("pseudo_cot", "refined_cot"):
            have = [r for r in cot_rows if r[source]]
            pick = sorted(rng.choice(len(have), size=min(args.judge_samples, len(have)), replace=False)) if have else []
            for i in pick:
                msgs = json.dumps(P.judge_messages(have[i][source]), sort_keys=True)
                version = f"{P.JUDGE_VERSION}|{source}|max={args.judge_max_new_tokens}|guided={not args.no_judge_guided}"
                rows.append({"key": row_key("judge", have[i]["sample_id"], content_hash(msgs), judge_model, version),
                             "sample_id": have[i]["sample_id"], "source": source, "messages": msgs})
        local = self.refiner == "local"
        guided = local and not args.no_judge_guided
        extra = {"judge": True, "judge_retries": args.judge_retries,
                 "json_schema": P.JUDGE_SCHEMA if (guided or not local) else None}
        fn, kw = self.local(judge_model, **extra) if local else self.refiner_fn(**extra)
        kw["sampling"] = {**kw["sampling"], "max_tokens": args.judge_max_new_tokens, "temperature": 0.3}
        done = self.generate("judge", rows, fn, kw, judge_model, P.JUDGE_VERSION, sanitize=False)
        records = [done[r["key"]] for r in rows if r["key"] in done]
        per_source = {}
        for source in ("pseudo_cot", "refined_cot"):
            recs = [r for r in records if r["source"] == source]
            valid = [json.loads(r["scores"]) for r in recs if r["valid"]]
            per_source[source] = {
                "judged": len(recs), "valid": len(valid), "invalid": len(recs) - len(valid),
                "mean_scores": {d: round(float(np.mean([v[d]["score"] for v in valid])), 3) if valid else None
                                for d in P.JUDGE_DIMENSIONS},
            }
        judge.update({"model": f"{self.refiner}:{judge_model}", "constrained_json": extra["json_schema"] is not None,
                      "retries": args.judge_retries, "per_source": per_source,
                      "records": [{"sample_id": r["sample_id"], "source": r["source"], "valid": bool(r["valid"]),
                                   "attempts": int(r["attempts"]),
                                   "scores": json.loads(r["scores"]) if r["valid"] else None,
                                   "raw": None if r["valid"] else (r["text"] or "")[:500]} for r in records]})
        return judge

    def audit(self, table, leakage: dict, judge: dict) -> dict:
        """audit.json's content; a rerun keeps the timings of the run that generated each step."""
        stage1, args, s1, timings = self.stage1, self.args, self.s1, self.timings
        old_audit = json.loads((stage1 / "audit.json").read_text()) if (stage1 / "audit.json").exists() else {}
        for step, t in (old_audit.get("timings") or {}).items():
            if timings.get(step, {}).get("rows", 0) == 0 and t.get("rows"):
                timings[step] = t
        tokens = [t for t in table.column("pseudo_tokens").to_pylist() + table.column("refined_tokens").to_pylist() if t]
        return {"leakage": leakage, "judge": judge, "timings": timings,
                "generated_tokens": {"stored_total": int(sum(tokens))},
                "settings": {"cot_model": self.gen_model, "refiner": self.refiner, "refiner_model": self.refiner_model,
                             "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                             "captions": self.has_captions, "cot_source": s1.cot_source,
                             "refine_with_pseudo_cot": s1.refine_with_pseudo_cot,
                             "refine_with_captions": s1.refine_with_captions, "pool_size": s1.pool_size,
                             "batch_size": s1.batch_size}}


def main(args: argparse.Namespace) -> int:
    from mllmrec_ray.io import atomic_write_json, atomic_write_parquet

    run = CotRun(args)
    stage1 = run.stage1
    pseudo = run.pseudo()
    refined = run.refine(pseudo)
    table, cot_rows, leakage = run.cot_table(pseudo, refined)
    if not leakage["clean"]:
        print(f"[cot] LEAKAGE CHECK FAILED, cot.parquet not written: {leakage['offending'][:10]}", flush=True)
        atomic_write_json(stage1 / "audit.json", {"leakage": leakage})
        return 1
    atomic_write_parquet(table, stage1 / "cot.parquet")
    judge = run.judge(cot_rows)
    atomic_write_json(stage1 / "audit.json", run.audit(table, leakage, judge))
    short = {k: v for k, v in leakage.items() if k != "offending"}
    print(f"[cot] wrote {stage1 / 'cot.parquet'} ({len(cot_rows)} samples) and {stage1 / 'audit.json'}", flush=True)
    print(f"[cot] leakage: {json.dumps(short)}", flush=True)
    if args.judge_samples > 0:
        print(f"[cot] judge: {json.dumps(judge['per_source'])}", flush=True)
    print(f"[cot] timings: {json.dumps(run.timings)}", flush=True)
    return 0
