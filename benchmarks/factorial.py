"""Main effects and interaction of a 2 x 2 of models, paired over the samples all four ranked.

usage: python benchmarks/factorial.py A0B0.json A1B0.json A0B1.json A1B1.json --data RUN/data
           [--a NAME] [--b NAME] [--json OUT]

The four records are the cells (factor A off/on) x (factor B off/on), in that order. Per sample, the main
effect of A is ((A1B0 - A0B0) + (A1B1 - A0B1)) / 2 and the interaction (A1B1 - A0B1) - (A1B0 - A0B0); each is
a paired difference of two per-sample means, so `paired_bootstrap_diff` resamples the samples once for all
four models, as `paired.py` does for two.
"""

import argparse
import json
from pathlib import Path

from paired import METRICS, bootstrap, load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cells", nargs=4, metavar="RECORD", help="A0B0 A1B0 A0B1 A1B1 evaluation records")
    p.add_argument("--data", required=True, help="the prepared data dir all four were evaluated on")
    p.add_argument("--a", default="A", help="factor A's name in the output")
    p.add_argument("--b", default="B", help="factor B's name in the output")
    p.add_argument("--json", help="also write the effects here")
    args = p.parse_args()
    loaded = [load(path, args.data) for path in args.cells]
    if len({(rec["split"], rec["candidates"]) for rec, _, _ in loaded}) != 1:
        raise SystemExit("error: the four records are not on one split and candidate set")
    common = set(loaded[0][1]).intersection(*(set(sids) for _, sids, _ in loaded[1:]))
    if not common:
        raise SystemExit("error: the four records share no sample")
    order = sorted(common)
    rows = []
    for m in METRICS:
        if not all(m in v for _, _, v in loaded):
            continue
        # one aligned per-sample array per cell
        c00, c10, c01, c11 = (
            v[m][[{s: i for i, s in enumerate(sids)}[s] for s in order]] for _, sids, v in loaded
        )
        effects = {
            f"main {args.a}": ((c10 + c11) / 2, (c00 + c01) / 2),
            f"main {args.b}": ((c01 + c11) / 2, (c00 + c10) / 2),
            f"{args.a} x {args.b}": (c11 + c00, c01 + c10),
        }
        for name, (x, y) in effects.items():
            d = bootstrap(name, loaded[0][0]["split"], m, x, y)
            rows.append({"effect": name, "metric": m, "n": len(order), **d})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
