"""Ray actor: one scorer of a score-mode evaluation split over several (`mllmrec eval --workers N`).

On CPU a forward on one thread costs less CPU time than the same forward on two: 2.33 against 2.81
CPU seconds a served request on the AVX2 box (`benchmarks/results/serve/avx2-replicas.md`), as a
2-thread forward waits at every barrier for a thread something else preempted. So two one-thread
scorers, each ranking its own chunks of samples, finish an evaluation sooner than one 2-thread
scorer: the demo's SFT model on test took 245.6 and 249.1 s against 285.2 s there (README, evaluation
throughput). Chunks are the job's own chunks, scored exactly as the job would score them.
"""

from __future__ import annotations

from typing import Any


class EvalScorer:
    """`HFScorer` on `threads` torch threads plus what ranking a chunk of rows needs.

    messages_of: `mllmrec_ray.prompting.prompts.EvalMessages` (the job's prompt builder).
    """

    def __init__(self, model_path: str, messages_of: Any, titles: dict, readout: str, ensemble: int, seed: int,
                 dtype: str = "auto", adapter: bool = False, batch: int = 8, threads: int = 1):
        from mllmrec_ray.ranking.scoring import HFScorer

        self.scorer = HFScorer(model_path, dtype=dtype, threads=threads, adapter=adapter, batch=batch)
        self.messages_of, self.titles = messages_of, titles
        self.readout, self.ensemble, self.seed = readout, ensemble, seed

    def rank(self, rows: list[dict]) -> list[list[str]]:
        from mllmrec_ray.ranking.scoring import rank_samples_over_orders

        return rank_samples_over_orders(self.scorer, self.scorer.tokenizer, rows, self.messages_of, self.titles,
                                        self.readout, self.ensemble, self.seed)[0]
