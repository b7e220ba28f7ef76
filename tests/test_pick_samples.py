"""Training subsets: CoT samples first, GRPO kept off SFT's windows while unseen ones remain."""

from mllmrec_ray.data.run_data import pick_samples


def _samples(n):
    return [{"sample_id": f"u{i // 5}_t{i % 5}"} for i in range(n)]


def test_must_first_then_seeded_fill_in_file_order():
    samples = _samples(40)
    got = pick_samples(samples, {"u7_t3", "u0_t0"}, 10, seed=0)
    ids = [s["sample_id"] for s in got]
    assert {"u7_t3", "u0_t0"} <= set(ids) and len(ids) == 10
    assert ids == [s["sample_id"] for s in samples if s["sample_id"] in ids]  # file order kept
    assert got == pick_samples(samples, {"u7_t3", "u0_t0"}, 10, seed=0)  # seeded
    assert got != pick_samples(samples, {"u7_t3", "u0_t0"}, 10, seed=1)


def test_avoid_comes_last_and_empty_avoid_keeps_the_old_pick():
    samples = _samples(40)
    sft = {s["sample_id"] for s in pick_samples(samples, set(), 25, seed=0)}
    # same seed as SFT: without `avoid` GRPO's 10 would all be SFT windows
    assert {s["sample_id"] for s in pick_samples(samples, set(), 10, seed=0)} <= sft
    grpo = {s["sample_id"] for s in pick_samples(samples, {"u1_t1"}, 10, seed=0, avoid=sft)}
    assert "u1_t1" in grpo  # a CoT sample stays even when SFT saw it
    assert len(grpo - sft) == 10 - ("u1_t1" in sft)
    # more wanted than unseen windows exist: all unseen ones, then SFT's
    big = {s["sample_id"] for s in pick_samples(samples, set(), 20, seed=0, avoid=sft)}
    assert len(big) == 20 and set(s["sample_id"] for s in samples) - sft <= big
