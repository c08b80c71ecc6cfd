"""Long-context probes: passkey retrieval, needle in a haystack, and loss by position.

Retrieval (Mohtashami & Jaggi 2023's passkey test; Kamradt's needle-in-a-haystack grid): a
random 5-digit key is stated once inside a haystack, at a relative depth (0 = the start, 1 = the
end), and the model is asked for it at the end. The row is exactly ``length`` tokens (the
question and the key included). The haystack is a repeated neutral filler (the passkey form) or
a text file's tokens (the needle form). A trial is a success when the key is the model's greedy
continuation, judged by one forward pass (every key token is the argmax given the tokens before
it: the same as greedy decoding producing the key), and its log-probability is kept as a
graded measure. Results: accuracy and mean key log-probability per (length, depth) cell.

Loss by position: documents cut to a length are scored token by token (as
``megatron_ct/evaluation/bpb.py`` scores them) and the NLL is summed per position bucket; bits
per byte per bucket count the UTF-8 bytes of the bucket's detokenized tokens. A model that
uses a longer context shows falling loss at later positions; one pushed past its trained length
shows it rising there.

Both run on a :class:`~megatron_ct.evaluation.session.ModelSession`: one of our checkpoints at
any TP/PP/CP, or a Hugging Face directory.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_ct.errors import ConfigError, DataError

# Neutral filler (written for this test): nothing in it looks like a number or a key.
FILLER = (
    "The river keeps moving past the old mill. Clouds drift slowly over the quiet hills. "
    "A bell rings somewhere in the town below. Nobody is in a hurry on this road. "
    "The fields are wide and the afternoon is long. "
)
INTRO = "There is a pass key hidden in the text below. Find it and remember it.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


@dataclass(frozen=True)
class Probe:
    length: int
    depth: float
    trial: int
    key: str
    context: list[int]
    answer: list[int]


def haystack_ids(tokenizer, text: str | None) -> list[int]:
    """Token ids of the haystack: ``text`` (a file's contents) or the repeated filler."""
    ids = tokenizer.encode(text if text else FILLER * 8)
    if not ids:
        raise DataError("haystack: the text has no tokens")
    return ids


def build_probes(
    tokenizer, hay: list[int], lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0
) -> list[Probe]:
    """Every (length, depth, trial) probe: ``len(context) + len(answer) == length``."""
    from megatron_ct.evaluation.lm import TextScorer

    rng = random.Random(seed)
    intro = tokenizer.encode(INTRO)
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    split = TextScorer(None, tokenizer).encode_pair  # the question/answer cut lm-eval makes
    probes = []
    for length in lengths:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ConfigError(f"--depths: expected fractions in [0, 1], got {depth}")
            for trial in range(trials):
                key = f"{rng.randrange(10000, 100000)}"
                stated = tokenizer.encode(needle(key))
                question, answer = split(QUESTION, " " + key)
                fill = length - len(prefix) - len(intro) - len(stated) - len(question) - len(answer)
                if fill < 1:
                    raise ConfigError(
                        f"--lengths: expected lengths above the probe's own {length - fill + 1} tokens, got {length}"
                    )
                start = rng.randrange(len(hay))  # another stretch of the haystack per trial
                body = [hay[(start + i) % len(hay)] for i in range(fill)]
                cut = round(depth * fill)
                context = prefix + intro + body[:cut] + stated + body[cut:] + question
                probes.append(Probe(length, depth, trial, key, context, answer))
    return probes


def retrieval_records(lm, probes: Sequence[Probe], task: str, progress: bool = False) -> list[dict]:
    """Score every probe (one forward pass each) and summarise each (length, depth) cell.

    ``progress``: a bar in tokens (rate and ETA; a 16k-token row takes minutes on a CPU) on
    the process that reports. Cells are scored one after another (collective: every rank
    scores the same cells), so the bar moves per cell."""
    import os

    from tqdm import tqdm

    cells: dict[tuple[int, float], list[Probe]] = {}
    for p in probes:
        cells.setdefault((p.length, p.depth), []).append(p)
    show = progress and int(os.environ.get("RANK", "0")) == 0
    bar = tqdm(total=sum(p.length for p in probes), unit="tok", unit_scale=True, desc=task, disable=not show)
    results: dict[tuple[int, float], list[tuple[float, bool]]] = {}
    for cell, members in cells.items():
        results[cell] = lm.loglikelihood([(p.context, p.answer) for p in members])
        bar.update(sum(p.length for p in members))
    bar.close()
    out = []
    for (length, depth), scored in results.items():
        out.append(
            {
                "task": task,
                "length": length,
                "depth": depth,
                "trials": len(scored),
                "accuracy": sum(g for _, g in scored) / len(scored),
                "key_logprob": sum(lp for lp, _ in scored) / len(scored),
            }
        )
    return out


def position_records(session, texts: list[str], length: int, bucket: int, batch: int) -> list[dict]:
    """Loss and bits per byte by position bucket over ``texts`` cut to ``length`` tokens
    (collective for our checkpoints; the figures on every process)."""
    import torch.distributed as dist

    from megatron_ct.evaluation.bpb import batches, prepare

    tok = session.tokenizer
    docs = prepare(texts, tok, length)
    if not docs:
        raise DataError("--position-text: no document has a token to score")
    nb = math.ceil(length / bucket)
    nll = torch.zeros(nb, dtype=torch.float64)
    count = torch.zeros(nb, dtype=torch.float64)
    nbytes = torch.zeros(nb, dtype=torch.float64)
    for d in docs:  # bytes of each bucket's tokens (position t predicts ids[t + 1])
        tokens = d.ids[1:]
        for b in range(nb):
            part = tokens[b * bucket : (b + 1) * bucket]
            if part:
                nbytes[b] += len(tok.decode(part).encode("utf-8"))
    scorer = session.nll_scorer()
    rank, size = session.shard
    for k, (idx, ids) in enumerate(batches(docs, batch, docs[0].ids[0])):
        if k % size != rank:
            continue
        got = scorer(ids)
        if got is None:
            continue
        for row, i in enumerate(idx):
            n = len(docs[i].ids) - 1
            values = got[row, :n].double()
            for b in range(nb):
                part = values[b * bucket : (b + 1) * bucket]
                nll[b] += part.sum()
                count[b] += part.numel()
    if not session.is_hf and dist.is_initialized():
        sums = torch.stack([nll, count]).to(session.device)
        dist.all_reduce(sums)  # the reporting rank (last stage, TP/CP rank 0) of each DP rank
        nll, count = sums.cpu()
    out = []
    for b in range(nb):
        if count[b] == 0:
            continue
        out.append(
            {
                "task": "position",
                "start": b * bucket,
                "end": min((b + 1) * bucket, length),
                "tokens": int(count[b]),
                "loss": float(nll[b] / count[b]),
                "bits_per_byte": float(nll[b] / math.log(2) / nbytes[b]) if nbytes[b] else None,
            }
        )
    return out


def plot_heatmaps(records: list[dict], path: str) -> str:
    """One accuracy heat map (depth x length) per retrieval task and label, side by side; each
    cell also gives the mean log-probability of the key."""
    from megatron_ct.plotting import pyplot, save_png

    plt = pyplot()
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r.get("task") in ("passkey", "needle"):
            groups.setdefault((r["task"], r.get("label") or r.get("checkpoint") or ""), []).append(r)
    if not groups:
        raise DataError(f"{path}: no passkey or needle records to draw")
    # constrained: the colour bar beside the panels, and no label clipped or drawn over a neighbour
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False, layout="constrained")
    for ax, ((task, label), rows) in zip(axes[0], groups.items(), strict=True):
        lengths = sorted({r["length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        logprob = torch.full_like(grid, float("nan"))  # the graded measure: a few keys make coarse accuracies
        for r in rows:
            grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
            logprob[depths.index(r["depth"]), lengths.index(r["length"])] = r.get("key_logprob", float("nan"))
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0][0]:  # the panels share their rows' meaning
            ax.set_ylabel("depth of the key")
        ax.set_title(f"{task}: {label}" if label else task, fontsize=9)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(grid[i, j]):
                    lp = "" if math.isnan(logprob[i, j]) else f"\nkey log p {logprob[i, j]:.1f}"
                    ax.text(j, i, f"{grid[i, j]:.2f}{lp}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    return save_png(fig, path)
