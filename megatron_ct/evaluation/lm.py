"""Log-likelihoods and greedy continuations of a language model: what downstream evaluation asks.

Two engines answer the same two questions on token ids:

- :class:`CTLM`: our model chunks at any TP/PP/DP, through megatron-core's forward-only
  schedule (:mod:`megatron_ct.model.inference`). Collective: every rank calls it with the same
  requests; data-parallel ranks share the work; every rank gets every answer.
- :class:`HFLM`: a Hugging Face ``transformers`` model in this process.

``loglikelihood(pairs)`` takes ``(context_ids, continuation_ids)`` pairs and returns, per pair, the
summed log-probability of the continuation given the context and whether greedy decoding would
have produced it, the two numbers lm-evaluation-harness asks of a model. Inputs are cut to the
last ``max_length`` tokens as lm-eval's ``hf`` model cuts them (the continuation is kept whole).
:class:`TextScorer` adds the tokenizer: string pairs in, split the way lm-eval splits them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

TokenPair = tuple[list[int], list[int]]


def _window(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The model input for a pair: ``(context + continuation)[:-1]``, its last ``max_length``."""
    return (context + continuation)[-(max_length + 1) :][:-1]


def _score_rows(logits: torch.Tensor, rows: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
    """``logits [b, s, V]`` of right-padded ``rows``: each row's continuation log-probability
    (its last ``len(target)`` positions) and whether every target token is the argmax."""
    out = []
    for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
        n = len(target)
        pos = logits[i, len(row) - n : len(row)].float().log_softmax(dim=-1)  # [n, V]
        t = torch.tensor(target, device=pos.device)
        logprob = pos.gather(1, t[:, None]).sum().item()
        greedy = bool((pos.argmax(dim=-1) == t).all())
        out.append((logprob, greedy))
    return out


def _batches(order: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches of ``batch_size``, longest first (padding stays small)."""
    ranked = sorted(order, key=lambda i: -lengths[i])
    return [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]


class HFLM:
    """A ``transformers`` causal LM in this process (eval mode, no gradients)."""

    def __init__(self, model, max_length: int, batch_size: int = 8) -> None:
        self.model = model.eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.no_grad():
            return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits

    def loglikelihood(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        rows = [_window(c, t, self.max_length) for c, t in pairs]
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for batch in _batches(list(range(len(pairs))), [len(r) for r in rows], self.batch_size):
            scored = _score_rows(self._logits([rows[i] for i in batch]), [rows[i] for i in batch],
                                 [pairs[i][1] for i in batch])  # fmt: skip
            for i, s in zip(batch, scored, strict=True):
                out[i] = s
        return out  # type: ignore[return-value]

    def greedy(self, context: list[int], max_new: int, stop: Callable[[list[int]], bool]) -> list[int]:
        new: list[int] = []
        while len(new) < max_new and not stop(new):
            row = (context + new)[-self.max_length :]
            new.append(int(self._logits([row])[0, -1].argmax()))
        return new


class CTLM:
    """Our model chunks (built and loaded at any TP/PP) as a scorer. Collective."""

    def __init__(self, chunks: list[torch.nn.Module], vocab_size: int, max_length: int, micro_batch_size: int = 4):
        from megatron.core import parallel_state as ps

        self.chunks = chunks
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.mbs = micro_batch_size
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.reports = (
            ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0
        )

    def _logits(self, rows: list[list[int]]) -> torch.Tensor | None:
        """Logits of right-padded rows (a multiple of the micro-batch: pad rows are copies of
        the first) on the last pipeline stage, None elsewhere."""
        from megatron_ct.model.inference import forward_logits

        width = max(len(r) for r in rows)
        n = -(-len(rows) // self.mbs) * self.mbs
        ids = torch.zeros(n, width, dtype=torch.long)
        for i in range(n):
            r = rows[i] if i < len(rows) else rows[0]
            ids[i, : len(r)] = torch.tensor(r)
        return forward_logits(self.chunks, ids, self.vocab_size, micro_batch_size=self.mbs)

    def _share(self, local):
        """Every rank gets what the reporting ranks (last stage, TP rank 0) of each DP rank hold."""
        import torch.distributed as dist

        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.dp_rank, local if self.reports else None))
        by_dp = {dp: value for dp, value in gathered if value is not None}
        return [by_dp[d] for d in sorted(by_dp)]

    def loglikelihood(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        rows = [_window(c, t, self.max_length) for c, t in pairs]
        mine = list(range(self.dp_rank, len(pairs), self.dp))  # data-parallel ranks share the requests
        batch = self.mbs * max(self.pp, 1)  # micro_batch_size x PP rows keep the pipeline full
        local: dict[int, tuple[float, bool]] = {}
        # Every DP rank runs the same number of batches (the pipeline of each needs no peer).
        for ids in _batches(mine, [len(r) for r in rows], batch):
            logits = self._logits([rows[i] for i in ids])
            if logits is not None:
                scored = _score_rows(logits, [rows[i] for i in ids], [pairs[i][1] for i in ids])
                local.update(zip(ids, scored, strict=True))
        merged: dict[int, tuple[float, bool]] = {}
        for part in self._share(local):
            merged.update(part)
        return [merged[i] for i in range(len(pairs))]

    def greedy(self, context: list[int], max_new: int, stop: Callable[[list[int]], bool]) -> list[int]:
        """Greedy continuation (no KV cache: one full forward per token); the same on every rank."""
        new: list[int] = []
        while len(new) < max_new and not stop(new):
            row = (context + new)[-self.max_length :]
            logits = self._logits([row])
            local = int(logits[0, len(row) - 1].argmax()) if logits is not None else None
            new.append(next(v for v in self._share(local) if v is not None))
        return new


class TextScorer:
    """String pairs -> ``(log-probability, is_greedy)`` through a tokenizer and an engine.

    The pair is split as lm-evaluation-harness splits it: trailing whitespace of the context
    moves to the continuation, the whole text is encoded once and the continuation is what
    follows the encoded context (so a token spanning the boundary is not split twice). An empty
    context is conditioned on BOS (or end-of-text without one), as lm-eval's ``hf`` model does.
    """

    def __init__(self, lm: CTLM | HFLM, tokenizer) -> None:
        self.lm = lm
        self.tokenizer = tokenizer

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx) :]

    @property
    def prefix_id(self) -> int:
        """What conditions an empty context: BOS when the tokenizer has one, else end-of-text."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eod_id

    def encode(self, context: str, continuation: str) -> TokenPair:
        if not context:  # the prefix token conditions it, unless the text starts with it
            cont = self.tokenizer.encode(continuation)
            prefix = self.prefix_id
            return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
        return self.encode_pair(context, continuation)

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.lm.loglikelihood([self.encode(context, continuation) for context, continuation in pairs])
