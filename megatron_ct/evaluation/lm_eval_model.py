"""megatron-ct checkpoints as an lm-evaluation-harness model: ``--model megatron_ct``.

    # any lm-eval task that exists locally, on one of our checkpoints at TP2 (2 processes)
    torchrun --nproc_per_node 2 -m lm_eval --model megatron_ct \\
        --model_args pretrained=runs/ct,tensor_model_parallel_size=2 --tasks my_local_task
    # in Python
    import megatron_ct.evaluation.lm_eval_model  # registers the model name
    lm_eval.simple_evaluate(model="megatron_ct", model_args="pretrained=runs/ct", tasks=[...])

The checkpoint is read at any saved layout and run at the requested TP/PP with its own tokenizer
(the one stored with it, or ``tokenizer=DIR``): no export to Hugging Face. Log-likelihoods use
the same token split, truncation and greediness test as lm-eval's ``hf`` model, so the numbers
compare with an exported model's (``tests/evaluation/test_lm_eval_model.py``).

Under ``torchrun`` every process runs lm-eval's whole loop (this model reports rank 0 of 1 to
lm-eval); the model-parallel and data-parallel ranks share each forward pass among themselves.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_ct.errors import ConfigError
from megatron_ct.evaluation.lm import CTLM, HFLM, TextScorer
from megatron_ct.evaluation.session import EvalOptions, open_model

DEFAULT_MAX_GEN_TOKS = 256


@register_model("megatron_ct")
class MegatronCTLM(TemplateLM):
    """An lm-eval ``LM`` over a :class:`~megatron_ct.evaluation.lm.CTLM` (or HFLM) engine."""

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        batch_size: int | str = 4,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        precision: str = "auto",
        device: str = "auto",
        engine: CTLM | HFLM | None = None,
        text_tokenizer=None,
        **_ignored,
    ) -> None:
        super().__init__()
        self._context = None
        if engine is None:
            if pretrained is None:
                raise ValueError("megatron_ct: pass pretrained=<checkpoint directory>")
            opts = EvalOptions(
                seq_length=int(max_length or EvalOptions().seq_length),
                micro_batch_size=int(batch_size) if str(batch_size).isdigit() else 4,
                tensor_model_parallel_size=int(tensor_model_parallel_size),
                pipeline_model_parallel_size=int(pipeline_model_parallel_size),
                precision=precision,
                device=device,
                progress=False,
            )
            self._context = open_model(pretrained, tokenizer, opts)
            session = self._context.__enter__()
            engine, text_tokenizer = session.lm(opts.seq_length), session.tokenizer
        self.engine = engine
        self.text = TextScorer(engine, text_tokenizer)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def from_engine(cls, engine: CTLM | HFLM, tokenizer, **kwargs) -> MegatronCTLM:
        """Around an engine that is already open (the trainer's model, a session's)."""
        return cls(engine=engine, text_tokenizer=tokenizer, **kwargs)

    def close(self) -> None:
        """Tear down the process group this model set up (if it opened the checkpoint itself)."""
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    # --- what TemplateLM needs -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.text.tokenizer.eod_id

    @property
    def prefix_token_id(self) -> int:
        """What conditions an empty context: BOS when the tokenizer has one (as lm-eval's ``hf``)."""
        return self.text.prefix_id

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def rank(self) -> int:
        return 0  # every process runs lm-eval's loop; the engine shares the work

    @property
    def world_size(self) -> int:
        return 1

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.text.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.text.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self.engine.loglikelihood([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods in disjoint windows of ``max_length`` (lm-eval's rule)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((ctx, cont))
                owner.append(i)
        scores = self.engine.loglikelihood(windows)
        out = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores, strict=True):
            out[i] += logprob
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (lm-eval's ``until``)."""
        out = []
        eos = self.tok_decode([self.eot_token_id])
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                raise ValueError("megatron_ct: generate_until supports greedy decoding only (do_sample=False)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            until = [*until, eos] if eos and eos not in until else until
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ctx = self.tok_encode(context)[-(self.max_length - max_new) :]

            def done(new: list[int], until=until) -> bool:
                return bool(new) and (new[-1] == self.eot_token_id or any(s in self.tok_decode(new) for s in until))

            text = self.tok_decode([t for t in self.engine.greedy(ctx, max_new, done) if t != self.eot_token_id])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out


# --- running lm-eval tasks on an engine --------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LmEvalTasks:
    """lm-evaluation-harness tasks to run besides the local ones."""

    names: list[str] = field(default_factory=list)
    """Task (or group) names lm-eval knows, e.g. from ``include_path``."""
    include_path: str | None = None
    """A directory of lm-eval task YAMLs (local data: ``dataset_path: json``)."""
    num_fewshot: int | None = None
    limit: int | None = None
    samples_dir: str | None = None
    """Write each task's per-item samples (lm-eval's ``log_samples``) as JSONL here."""


def lm_eval_records(engine, tokenizer, spec: LmEvalTasks, is_main: bool = True) -> list[dict[str, Any]]:
    """lm-eval's ``simple_evaluate`` on the engine (every rank runs it; the engine shares the work)."""
    if not spec.names:
        return []
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task data only: never wait on the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=spec.include_path) if spec.include_path else TaskManager()
    unknown = [n for n in spec.names if n not in manager.all_tasks]
    if unknown:
        where = f" (include path {spec.include_path})" if spec.include_path else ""
        raise ConfigError(f"--lm-eval-tasks {' '.join(unknown)}: lm-eval knows no such task{where}")
    lm = MegatronCTLM.from_engine(engine, tokenizer)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(spec.names),
        task_manager=manager,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        log_samples=spec.samples_dir is not None,
        verbosity="ERROR",
    )
    if results is None:  # lm-eval reports on the launch's rank 0 only
        return []
    if spec.samples_dir and is_main:
        _write_samples(spec.samples_dir, results.get("samples", {}))
    out = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            skip = metric.endswith("_stderr") or metric in ("alias", "sample_len")
            if skip or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            n = results.get("n-samples", {}).get(task, {}).get("effective")
            out.append(
                {
                    "task": task,
                    "metric": metric if filt in ("", "none") else f"{metric},{filt}",
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                    "template": None,
                    "n": n,
                    "suite": "lm_eval",
                }
            )
    return out


def _write_samples(directory: str, samples: dict[str, list]) -> None:
    import json

    os.makedirs(directory, exist_ok=True)
    for task, items in samples.items():
        with open(os.path.join(directory, f"{task}.jsonl"), "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
