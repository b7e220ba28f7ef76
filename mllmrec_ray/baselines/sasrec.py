"""SASRec (Kang & McAuley, 2018): a causal self-attentive next-item model, on CPU.

Choices, and why:
- Full-softmax cross-entropy over all items (tied input/output item embeddings)
  instead of BCE with one sampled negative: with ~1.7k items the full softmax is
  cheap on CPU and trains in far fewer epochs.
- Training sequences are the full chronological interaction sequences of training
  users, cut from the end into windows of `max_len + 1` items that overlap by one
  item, so every transition is predicted exactly once per epoch.
- Right padding with a causal mask: a real position never attends to padding, and
  positions count from the start of the window, so a 9-item history at inference
  looks exactly like the first 9 positions of a training window.
- Early stopping on NDCG@5 of the valid samples' stored candidate lists (smoother
  than HR on ~100 valid samples); the best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mllmrec_ray.ranking.metrics import per_sample


class SASRec(nn.Module):
    def __init__(self, n_items: int, hidden: int = 64, blocks: int = 2, heads: int = 1,
                 max_len: int = 50, dropout: float = 0.2):
        super().__init__()
        self.max_len = max_len
        self.shape = {"n_items": n_items, "hidden": hidden, "blocks": blocks, "heads": heads, "max_len": max_len}
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)  # index 0 = padding
        self.pos_emb = nn.Embedding(max_len, hidden)
        # Same small scale for both: PyTorch's default N(0, 1) positions would drown the items.
        nn.init.normal_(self.item_emb.weight, std=hidden ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=hidden, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) right-padded item indices -> hidden states (B, L, hidden)."""
        length = seq.shape[1]
        pos = torch.arange(length, device=seq.device)
        x = self.dropout(self.item_emb(seq) + self.pos_emb(pos))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=seq.device)
        return self.norm(self.encoder(x, mask=causal, is_causal=True))


class SASRecRanker:
    """A trained SASRec plus its item-id vocabulary; ranks candidate lists given histories."""

    def __init__(self, model: SASRec, item_ids: Sequence[str]):
        self.model = model
        self.item_ids = list(item_ids)
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}
        self.info: dict = {}

    def state(self) -> dict:
        """What `from_state` needs to rebuild this ranker: shape, weights, vocabulary, training info."""
        return {"shape": self.model.shape, "weights": self.model.state_dict(), "item_ids": self.item_ids,
                "info": self.info}

    @classmethod
    def from_state(cls, state: dict) -> "SASRecRanker":
        model = SASRec(**state["shape"], dropout=0.0)
        model.load_state_dict(state["weights"])
        model.eval()
        ranker = cls(model, state["item_ids"])
        ranker.info = dict(state.get("info") or {})
        return ranker

    @torch.no_grad()
    def rank(self, histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]],
             batch_size: int = 256) -> list[list[str]]:
        """One ranking (best first) of each candidate list; ties keep the list order."""
        self.model.eval()
        emb = self.model.item_emb.weight
        out: list[list[str]] = []
        for start in range(0, len(histories), batch_size):
            hist = [h[-self.model.max_len:] for h in histories[start:start + batch_size]]
            if any(len(h) == 0 for h in hist):
                raise ValueError("SASRec needs a non-empty history")
            seq = torch.zeros(len(hist), max(map(len, hist)), dtype=torch.long)
            for row, h in enumerate(hist):
                seq[row, :len(h)] = torch.tensor([self.index[i] for i in h])
            states = self.model(seq)
            for row, h in enumerate(hist):
                cands = list(candidates[start + row])
                scores = emb[[self.index[c] for c in cands]] @ states[row, len(h) - 1]
                order = torch.argsort(-scores, stable=True).tolist()
                out.append([cands[j] for j in order])
        return out


def fit_sasrec(
    sequences: Sequence[Sequence[str]],
    item_ids: Sequence[str],
    valid: tuple[Sequence[Sequence[str]], Sequence[Sequence[str]], Sequence[str]] | None = None,
    *,
    epochs: int = 30,
    patience: int = 5,
    batch_size: int = 128,
    lr: float = 5e-3,
    hidden: int = 64,
    blocks: int = 2,
    heads: int = 1,
    max_len: int = 50,
    dropout: float = 0.2,
    seed: int = 0,
    threads: int = 2,
    max_seconds: float | None = None,
    log: Callable[[str], None] | None = print,
) -> SASRecRanker:
    """Train SASRec on chronological item-id sequences.

    `valid` = (histories, candidate lists, targets): early stopping on its NDCG@5
    with `patience` epochs; without it the last epoch is kept. `max_seconds` (None
    or 0 = no limit) stops training after the epoch that crosses the time budget;
    that makes the result depend on machine speed, so `info["stopped_by"]` says
    which of "epochs", "patience" or "time" ended training.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    ranker = SASRecRanker(SASRec(len(item_ids), hidden, blocks, heads, max_len, dropout), item_ids)
    model = ranker.model

    windows = []
    for seq in sequences:
        idx = [ranker.index[i] for i in seq]
        end = len(idx)
        while end >= 2:
            windows.append(idx[max(0, end - max_len - 1):end])
            end -= max_len
    if not windows:
        raise ValueError("no training sequence has two or more items")
    inputs = torch.zeros(len(windows), max_len, dtype=torch.long)
    labels = torch.zeros(len(windows), max_len, dtype=torch.long)  # 0 = no label (padding)
    for row, w in enumerate(windows):
        inputs[row, :len(w) - 1] = torch.tensor(w[:-1])
        labels[row, :len(w) - 1] = torch.tensor(w[1:])

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    best_score, best_state, best_epoch, bad = -math.inf, None, 0, 0
    stopped_by = "epochs"
    t0 = time.perf_counter()
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(windows), generator=generator).split(batch_size):
            x, y = inputs[batch], labels[batch]
            # Scoring all items is the costly part: do it only at labelled positions.
            labelled = y > 0
            loss = loss_fn(model(x)[labelled] @ model.item_emb.weight.T, y[labelled])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        line = f"sasrec epoch {epoch:3d} loss {total / count:.4f}"
        if valid is not None:
            histories, cands, targets = valid
            score = float(np.mean(per_sample(ranker.rank(histories, cands), targets, (5,))["NDCG@5"]))
            line += f" valid NDCG@5 {score:.4f}"
            if score > best_score:
                best_score, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
        elapsed = time.perf_counter() - t0
        if log:
            log(f"{line} ({elapsed:.1f}s)")
        if valid is not None and bad >= patience:
            stopped_by = "patience"
            break
        if max_seconds and elapsed >= max_seconds and epoch < epochs:
            stopped_by = "time"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epoch
    model.eval()
    ranker.info = {"epochs_run": epoch, "best_epoch": best_epoch, "stopped_by": stopped_by,
                   "best_valid_NDCG@5": None if valid is None else best_score,
                   "train_seconds": round(time.perf_counter() - t0, 2),
                   "train_windows": len(windows)}
    return ranker
