"""Downstream multiple-choice tasks defined in local files, scored with several prompt templates.

CT is judged by downstream scores per stage, and those scores depend on the prompt: a task
here is evaluated under several templates and few-shot examples, and the spread across the
templates is reported next to the mean. The Hugging Face Hub is not needed: a task is one
YAML file over a local JSONL or CSV file. This module knows nothing about models; it turns
a task into (context, continuation) pairs and the scorer's log-likelihoods into metrics.

Task files
----------
One task per YAML file; relative paths are read from the YAML's directory. Every key::

    name: zh_sentiment              # reported with every number (default: the file's stem)
    language: zh                    # a free label (zh, en, ...), carried for reports
    format: multiple_choice         # the only format so far
    data: zh_sentiment_test.jsonl   # the items asked: .jsonl (one object a line) or .csv (header)
    limit: null                     # ask only the first N items (null: all)
    fewshot_data: zh_sentiment_dev.jsonl  # solved examples (null: from `data`, never the item asked)
    num_fewshot: 3                  # solved examples before each question
    fewshot_order: random           # random (seeded per item) | first (the file's first ones)
    seed: 1234                      # few-shot draw; the same examples for every template
    layout: null                    # ceval | cmmlu: their CSV columns, no `fields` needed
    fields:                         # where the item's parts are (defaults: question, choices, answer)
      question: review              # the column {question} stands for
      choices: null                 # a list column (default: choices), or columns [A, B, C, D]
      answer: label                 # the right choice's column
    fixed_choices: [负面, 正面]      # the same choices for every item (instead of fields.choices)
    answer_format: text             # index (0-based) | letter (A, B, ...) | text (a choice) | auto
    templates:                      # at least one; every template asks every item
      - name: label                 # reported with its numbers
        description: ""             # before the first example (placeholders as in prompt)
        prompt: "评论：{review}\\n情感："  # the question: {column}s of the row and the helpers below
        choice: "{choice}"          # each answer: {choice} (its text), {letter} (A, B, ...), {index}
        target_delimiter: ""        # between prompt and choice (" " in English, the default)
        fewshot_separator: "\\n\\n"   # after each solved example (the default)
        verbalizer: null            # words for the choices in this template, e.g. [差评, 好评]
      - name: letters
        prompt: "评论：{question}\\n{choices_block}\\n答案："
        choice: "{letter}"
        target_delimiter: ""

Placeholders (Python ``str.format``; ``{{`` and ``}}`` are literal braces): in ``prompt`` and
``description``, any column of the row and the helpers ``{question}`` (the ``fields.question``
column), ``{choices_block}`` (one ``A. text`` line per choice) and ``{choices_inline}``
(``(A) text (B) text``); in ``choice``, ``{choice}``, ``{letter}`` and ``{index}``. A
placeholder the data does not have is an error when the task loads, before any model runs.

The request for item *i*, choice *j* under a template::

    context      = description + (prompt(ex) + target_delimiter + choice(ex, its answer)
                                  + fewshot_separator for ex in the few-shot examples) + prompt(i)
    continuation = target_delimiter + choice(i, j)

**C-Eval and CMMLU.** ``layout: ceval`` reads C-Eval's CSVs (columns
``id,question,A,B,C,D,answer[,explanation]``, the answer a letter) and ``layout: cmmlu``
CMMLU's (``,Question,A,B,C,D,Answer``: an unnamed index column first), so a task is::

    name: ceval_computer_network
    language: zh
    layout: ceval
    data: ceval/val/computer_network_val.csv
    fewshot_data: ceval/dev/computer_network_dev.csv
    num_fewshot: 5
    fewshot_order: first
    templates:
      - name: ceval
        description: "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\\n\\n"
        prompt: "{question}\\n{choices_block}\\n答案："
        choice: "{letter}"
        target_delimiter: ""

(C-Eval's test CSVs hold no answers: ask ``val``, draw examples from ``dev``.)

Metrics
-------
Per template: ``acc`` (the choice of highest log-likelihood is the answer) and ``acc_norm``
(highest log-likelihood per UTF-8 byte of the continuation as sent, delimiter included), each
with the standard error of
a mean of 0/1 scores, ``sqrt(p (1 - p) / (n - 1))``. Across templates: the mean (its standard
error from each item's mean score over the templates, which keeps the templates' correlation)
and the spread (sample standard deviation, min, max). Ties go to the first choice.

The scorer (:data:`Scorer`) gets (context, continuation) strings and tokenizes them itself, in
lm-evaluation-harness's way: the context's trailing whitespace moves to the continuation.

API
---
:func:`load_task` (one YAML), :func:`load_tasks` (files, directories, or the names of the
shipped examples: :func:`shipped_tasks`), :func:`evaluate_task` (one scorer call with every
pair of the task, so a distributed scorer is called the same number of times on every rank),
:func:`evaluate_tasks` (one call for several tasks); :meth:`Task.requests` and
:meth:`Task.result` are the two halves. Bad input is a one-line
:class:`~megatron_ct.errors.ConfigError` (the YAML) or :class:`~megatron_ct.errors.DataError`
(the data) naming the file and line.

Shipped examples (``megatron_ct/evaluation/tasks/``, rebuilt by its ``build_examples.py``):
``zh_sentiment`` (review sentiment, 2 choices), ``zh_review_next`` (a review's next sentence, 4)
and ``en_doc_next`` (the next sentence of Python's documentation, 4), three templates each. Each
asks ``<name>_test.jsonl`` and draws examples from ``<name>_dev.jsonl``: tune recipes on dev (a
copy of the YAML with ``data`` pointing at it) and report test.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import statistics
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_ct.errors import ConfigError, DataError

# (context, continuation) pairs -> (summed log-probability of the continuation, is greedy), in order.
Scorer = Callable[[list[tuple[str, str]]], list[tuple[float, bool]]]

TASKS_DIR = Path(__file__).with_name("tasks")
"""The shipped example tasks (YAML + data), loadable by name."""

FORMATS = ("multiple_choice",)
ANSWER_FORMATS = ("auto", "index", "letter", "text")
FEWSHOT_ORDERS = ("random", "first")
LAYOUTS: dict[str, dict[str, Any]] = {
    "ceval": {"question": "question", "choices": ("A", "B", "C", "D"), "answer": "answer"},
    "cmmlu": {"question": "Question", "choices": ("A", "B", "C", "D"), "answer": "Answer"},
}
LAYOUT_COLUMNS = {"ceval": "id,question,A,B,C,D,answer[,explanation]", "cmmlu": ",Question,A,B,C,D,Answer"}
PROMPT_HELPERS = ("question", "choices_block", "choices_inline")
CHOICE_PLACEHOLDERS = ("choice", "letter", "index")
LETTERS = string.ascii_uppercase
METRICS = ("acc", "acc_norm")
DATA_SUFFIXES = (".jsonl", ".csv")


class _Invalid(ConfigError):
    """A bad value of one key; :func:`load_task` puts the file and the key's line in front."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _show(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise _Invalid(key, f"got {_show(value)}; expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: Any, key: str, expected: str, minimum: int = 1) -> tuple[str, ...]:
    """A list of non-empty strings as a tuple (YAML gives lists; frozen configs keep tuples)."""
    ok = isinstance(value, (list, tuple)) and len(value) >= minimum
    ok = ok and all(isinstance(v, str) and v != "" for v in value)
    _require(ok, key, value, expected)
    return tuple(value)


def placeholders(text: str, key: str = "template") -> tuple[str, ...]:
    """The ``{name}`` placeholders of a ``str.format`` text, in order, each once."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        msg = f"{exc} in {_show(text)}; expected str.format text ({{{{ and }}}} are literal braces)"
        raise _Invalid(key, msg) from None
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise _Invalid(key, f"positional placeholder {{{name}}} in {_show(text)}; expected {{name}} placeholders")
        if "." in name or "[" in name:
            raise _Invalid(key, f"{{{name}}} in {_show(text)}; expected a plain {{name}} (no attributes or indices)")
        if (spec and "{" in spec) or conversion not in (None, "r", "s", "a"):
            raise _Invalid(key, f"{{{name}}} in {_show(text)}; expected a plain {{name}} or {{name:spec}}")
        names.append(name)
    return tuple(dict.fromkeys(names))


# --- the schema -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Template:
    """One way to ask the task's items (prompt sensitivity is measured across templates)."""

    name: str
    """Reported with each of its numbers; unique within the task."""
    prompt: str
    """The question: ``str.format`` text over the row's columns and the helpers ``{question}``,
    ``{choices_block}`` (``A. text`` lines) and ``{choices_inline}`` (``(A) text (B) text``)."""
    choice: str = "{choice}"
    """Each answer as a continuation: ``{choice}`` (its text), ``{letter}`` (A, B, ...), ``{index}`` (0, 1, ...)."""
    target_delimiter: str = " "
    """Between the prompt and the choice, in the question and the solved examples ('' for prompts ending in '：')."""
    fewshot_separator: str = "\n\n"
    """After each solved example."""
    description: str = ""
    """Text before the first solved example (placeholders as in ``prompt``, from the item asked)."""
    verbalizer: tuple[str, ...] | None = None
    """Words standing for the choices in this template, in the task's choice order (e.g. [差评, 好评]
    for [负面, 正面]); ``{choice}`` and the helpers show them. None: the choices themselves."""

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name.strip() != "", "name", self.name, "a non-empty string")
        _require("\n" not in self.name, "name", self.name, "a name on one line")
        for key in ("prompt", "choice", "target_delimiter", "fewshot_separator", "description"):
            _require(isinstance(getattr(self, key), str), key, getattr(self, key), "a string")
        _require(self.prompt != "", "prompt", self.prompt, "a non-empty string")
        placeholders(self.prompt, "prompt")
        placeholders(self.description, "description")
        used = placeholders(self.choice, "choice")
        unknown = [p for p in used if p not in CHOICE_PLACEHOLDERS]
        if unknown:
            raise _Invalid(
                "choice", f"{{{unknown[0]}}} in {_show(self.choice)}; expected {{choice}}, {{letter}} or {{index}}"
            )
        if not used:
            raise _Invalid(
                "choice",
                f"got {_show(self.choice)}, the same text for every choice; expected {{choice}}, "
                "{letter} or {index} in it",
            )
        if self.verbalizer is not None:
            object.__setattr__(self, "verbalizer", _strings(self.verbalizer, "verbalizer", "a list of >= 2 words", 2))

    def used_fields(self) -> tuple[str, ...]:
        """Placeholders of the prompt and the description (columns or helpers)."""
        return tuple(dict.fromkeys(placeholders(self.description) + placeholders(self.prompt)))


@dataclass(frozen=True, kw_only=True)
class Fields:
    """Where a row keeps the parts of a multiple-choice item."""

    question: str = "question"
    """The column ``{question}`` stands for (needed only when a template uses ``{question}``)."""
    choices: str | tuple[str, ...] | None = None
    """A column holding a list of choices (JSONL), or several columns with one choice each
    (``[A, B, C, D]``). None: the column ``choices``, unless the task has ``fixed_choices``."""
    answer: str = "answer"
    """The column of the right choice (read as ``answer_format`` says)."""

    def __post_init__(self) -> None:
        for key in ("question", "answer"):
            _require(isinstance(getattr(self, key), str), key, getattr(self, key), "a column name")
        if isinstance(self.choices, (list, tuple)):
            object.__setattr__(self, "choices", _strings(self.choices, "choices", "a list of >= 2 column names", 2))
        else:
            _require(
                self.choices is None or isinstance(self.choices, str),
                "choices",
                self.choices,
                "a column name or a list of column names",
            )


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """One task file, checked as it is built (the data is checked by :func:`load_task`)."""

    name: str
    """Reported with every number of the task."""
    data: str
    """The items asked: a ``.jsonl`` (one JSON object a line) or ``.csv`` (a header line) file."""
    templates: tuple[Template, ...]
    """At least one; every template asks every item, with the same few-shot examples."""
    language: str | None = None
    """A free label (zh, en, ...), for reports."""
    format: str = "multiple_choice"
    """What the task asks: ``multiple_choice`` (room for ``loglikelihood``/``perplexity`` later)."""
    limit: int | None = None
    """Ask only the first ``limit`` items of ``data`` (None: all)."""
    fewshot_data: str | None = None
    """Solved examples; None: drawn from ``data`` (all of it, not only the first ``limit``),
    never the item asked nor one with the same question and choices."""
    num_fewshot: int = 0
    """Solved examples before each question."""
    fewshot_order: str = "random"
    """``random``: drawn per item with ``seed``; ``first``: the first ones of the file."""
    seed: int = 1234
    """Seed of the few-shot draw (item i's examples depend only on seed and i)."""
    layout: str | None = None
    """``ceval`` or ``cmmlu``: those CSV layouts' columns stand in for ``fields``."""
    fields: Fields | None = None
    """Where the question, choices and answer are (None: the layout's, or the defaults of :class:`Fields`)."""
    fixed_choices: tuple[str, ...] | None = None
    """The same choices for every item (e.g. [负面, 正面]), instead of ``fields.choices``."""
    answer_format: str = "auto"
    """``index`` (0-based), ``letter`` (A, B, ...), ``text`` (equal to a choice), or ``auto``:
    the one format that fits every answer (an error where several fit and disagree)."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.name, str) and self.name.strip() != "" and "\n" not in self.name,
            "name",
            self.name,
            "a non-empty name on one line",
        )
        _require(isinstance(self.data, str) and self.data != "", "data", self.data, "a path to a .jsonl or .csv file")
        _require(
            self.fewshot_data is None or (isinstance(self.fewshot_data, str) and self.fewshot_data != ""),
            "fewshot_data",
            self.fewshot_data,
            "a path to a .jsonl or .csv file, or null",
        )
        _require(self.language is None or isinstance(self.language, str), "language", self.language, "a string")
        _require(self.format in FORMATS, "format", self.format, " or ".join(FORMATS))
        _require(
            self.limit is None or (_is_int(self.limit) and self.limit >= 1),
            "limit",
            self.limit,
            "an integer >= 1 or null",
        )
        _require(
            _is_int(self.num_fewshot) and self.num_fewshot >= 0, "num_fewshot", self.num_fewshot, "an integer >= 0"
        )
        _require(self.fewshot_order in FEWSHOT_ORDERS, "fewshot_order", self.fewshot_order, " or ".join(FEWSHOT_ORDERS))
        _require(_is_int(self.seed), "seed", self.seed, "an integer")
        _require(
            self.layout is None or self.layout in LAYOUTS, "layout", self.layout, f"{' or '.join(LAYOUTS)} or null"
        )
        _require(
            self.fields is None or isinstance(self.fields, Fields),
            "fields",
            self.fields,
            "a mapping of the question, choices and answer columns",
        )
        _require(self.answer_format in ANSWER_FORMATS, "answer_format", self.answer_format, ", ".join(ANSWER_FORMATS))
        if self.layout is not None and self.fields is not None:
            raise _Invalid("fields", f"given with layout {self.layout!r}; expected one of them")
        if self.fixed_choices is not None:
            fixed = _strings(self.fixed_choices, "fixed_choices", "a list of >= 2 choice texts", 2)
            object.__setattr__(self, "fixed_choices", fixed)
            if self.layout is not None or (self.fields is not None and self.fields.choices is not None):
                raise _Invalid("fixed_choices", "given with choices from the data; expected one of them")
        ok = isinstance(self.templates, (list, tuple)) and len(self.templates) > 0
        _require(
            ok and all(isinstance(t, Template) for t in self.templates),
            "templates",
            self.templates,
            "a non-empty list of templates",
        )
        object.__setattr__(self, "templates", tuple(self.templates))
        names = [t.name for t in self.templates]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise _Invalid("templates", f"two templates named {dup!r}; expected unique names")

    @property
    def field_map(self) -> Fields:
        """The fields in effect (the layout's, the given ones, or the defaults)."""
        if self.layout is not None:
            return Fields(**LAYOUTS[self.layout])
        return self.fields or Fields()

    @property
    def choice_columns(self) -> str | tuple[str, ...] | None:
        """The choices' column(s); None with ``fixed_choices``."""
        if self.fixed_choices is not None:
            return None
        return self.field_map.choices if self.field_map.choices is not None else "choices"


# --- the loaded task ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Item:
    """One multiple-choice question of a data file."""

    source: str
    """The data file."""
    line: int
    """Its (first) line in the data file."""
    row: Mapping[str, str]
    """The row's scalar fields as text (what the templates' placeholders read)."""
    choices: tuple[str, ...]
    """The choice texts."""
    answer: int
    """Index of the right choice."""
    key: tuple
    """Question and choices: few-shot examples never share it with the item asked."""


@dataclass(frozen=True, kw_only=True)
class Request:
    """One (context, continuation) pair to score."""

    template: str
    item: int
    """Index into :attr:`Task.items`."""
    choice: int
    context: str
    continuation: str


@dataclass(frozen=True, kw_only=True)
class Task:
    """A task ready to ask: its configuration and its checked items."""

    config: TaskConfig
    source: str
    """The YAML file (or a label for a task built in code)."""
    items: tuple[Item, ...]
    """The items asked (the first ``limit`` of the data)."""
    fewshot_pool: tuple[Item, ...]
    """Where solved examples come from (all of ``data`` when there is no ``fewshot_data``)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def language(self) -> str | None:
        return self.config.language

    def fewshot(self, index: int) -> tuple[Item, ...]:
        """The solved examples shown before item ``index`` (the same for every template)."""
        k, pool, asked = self.config.num_fewshot, self.fewshot_pool, self.items[index]
        if k == 0:
            return ()

        def allowed(ex: Item) -> bool:
            return ex.key != asked.key and not (ex.source == asked.source and ex.line == asked.line)

        chosen: list[Item] = []
        if self.config.fewshot_order == "first":
            for ex in pool:
                if len(chosen) == k:
                    break
                if allowed(ex):
                    chosen.append(ex)
        else:
            # Item i's draw depends only on (seed, i): a limit or another task order changes nothing.
            rng, seen = random.Random(f"{self.config.seed}:{index}"), set()
            while len(chosen) < k and len(seen) < len(pool):
                j = rng.randrange(len(pool))
                if j not in seen:
                    seen.add(j)
                    if allowed(pool[j]):
                        chosen.append(pool[j])
        if len(chosen) < k:
            raise ConfigError(
                f"{self.source}: num_fewshot: {len(chosen)} examples differ from the item at {asked.source}:"
                f"{asked.line}; expected num_fewshot <= {len(chosen)} or more few-shot data"
            )
        return tuple(chosen)

    def _words(self, template: Template, item: Item) -> tuple[str, ...]:
        return template.verbalizer if template.verbalizer is not None else item.choices

    def _fill(self, text: str, template: Template, item: Item) -> str:
        words = self._words(template, item)
        values = dict(item.row)
        question = self.config.field_map.question
        if question in item.row:
            values["question"] = item.row[question]
        values["choices_block"] = "\n".join(f"{LETTERS[j]}. {w}" for j, w in enumerate(words))
        values["choices_inline"] = " ".join(f"({LETTERS[j]}) {w}" for j, w in enumerate(words))
        return text.format_map(values)

    def _choice(self, template: Template, item: Item, j: int) -> str:
        word = self._words(template, item)[j]
        return template.target_delimiter + template.choice.format(choice=word, letter=LETTERS[j], index=j)

    def solved(self, template: Template, item: Item) -> str:
        """``item`` asked and answered under ``template`` (a few-shot example, without the separator)."""
        return self._fill(template.prompt, template, item) + self._choice(template, item, item.answer)

    def context(self, template: Template, index: int, shots: Sequence[Item] | None = None) -> str:
        """The text before item ``index``'s choices under ``template``."""
        item = self.items[index]
        shots = self.fewshot(index) if shots is None else shots
        solved = "".join(self.solved(template, ex) + template.fewshot_separator for ex in shots)
        return self._fill(template.description, template, item) + solved + self._fill(template.prompt, template, item)

    def continuations(self, template: Template, index: int) -> list[str]:
        """Each choice of item ``index`` as a continuation under ``template``."""
        item = self.items[index]
        return [self._choice(template, item, j) for j in range(len(item.choices))]

    def requests(self) -> list[Request]:
        """Every pair of the task: template by template, item by item, choice by choice."""
        shots = [self.fewshot(i) for i in range(len(self.items))]
        out = []
        for t in self.config.templates:
            for i in range(len(self.items)):
                ctx = self.context(t, i, shots[i])
                out += [
                    Request(template=t.name, item=i, choice=j, context=ctx, continuation=c)
                    for j, c in enumerate(self.continuations(t, i))
                ]
        return out

    def result(self, scores: Sequence[tuple[float, bool]], requests: Sequence[Request] | None = None) -> TaskResult:
        """Metrics from the scorer's answers to ``requests`` (default: :meth:`requests`), in that order."""
        requests = self.requests() if requests is None else requests
        if len(scores) != len(requests):
            raise ValueError(f"task {self.name}: the scorer returned {len(scores)} scores for {len(requests)} pairs")
        n = len(self.items)
        per_template = []
        correct: dict[str, list[list[float]]] = {m: [[0.0] * n for _ in self.config.templates] for m in METRICS}
        at = 0
        for ti, t in enumerate(self.config.templates):
            preds, preds_norm = [], []
            for i, item in enumerate(self.items):
                k = len(item.choices)
                lls = [_finite(float(s[0])) for s in scores[at : at + k]]
                conts = [r.continuation for r in requests[at : at + k]]
                at += k
                norm = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, conts, strict=True)]
                preds.append(_argmax(lls))
                preds_norm.append(_argmax(norm))
                correct["acc"][ti][i] = float(preds[-1] == item.answer)
                correct["acc_norm"][ti][i] = float(preds_norm[-1] == item.answer)
            metrics = {m: _mean_and_stderr(correct[m][ti]) for m in METRICS}
            per_template.append(
                TemplateResult(
                    template=t.name, n=n, metrics=metrics, predictions=tuple(preds), predictions_norm=tuple(preds_norm)
                )
            )
        aggregates = {}
        for m in METRICS:
            values = [r.metrics[m].value for r in per_template]
            per_item = [
                math.fsum(correct[m][ti][i] for ti in range(len(per_template))) / len(per_template) for i in range(n)
            ]
            mean = _mean_and_stderr(per_item)
            aggregates[m] = Aggregate(
                metric=m,
                mean=mean.value,
                stderr=mean.stderr,
                std=statistics.stdev(values) if len(values) > 1 else None,
                min=min(values),
                max=max(values),
            )
        return TaskResult(
            task=self.name,
            language=self.language,
            n=n,
            num_fewshot=self.config.num_fewshot,
            templates=tuple(per_template),
            aggregates=aggregates,
        )


def _finite(x: float) -> float:
    return -math.inf if math.isnan(x) else x  # a NaN score never wins


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))  # ties: the first choice


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """A mean score and its standard error."""

    value: float
    stderr: float | None
    """``sqrt(var / n)`` with the sample variance; ``sqrt(p (1 - p) / (n - 1))`` for 0/1 scores. None for n = 1."""


def _mean_and_stderr(xs: Sequence[float]) -> Estimate:
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Estimate(value=mean, stderr=None)
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return Estimate(value=mean, stderr=math.sqrt(var / n))


@dataclass(frozen=True, kw_only=True)
class TemplateResult:
    """The numbers of one template."""

    template: str
    n: int
    """Items scored."""
    metrics: dict[str, Estimate]
    """``acc`` and ``acc_norm``."""
    predictions: tuple[int, ...]
    """The chosen choice per item (highest log-likelihood)."""
    predictions_norm: tuple[int, ...]
    """The chosen choice per item (highest log-likelihood per byte)."""


@dataclass(frozen=True, kw_only=True)
class Aggregate:
    """One metric across the templates."""

    metric: str
    mean: float
    """Mean over the templates."""
    stderr: float | None
    """Standard error of the mean, from each item's mean score over the templates."""
    std: float | None
    """Sample standard deviation over the templates (None with one template)."""
    min: float
    max: float


@dataclass(frozen=True, kw_only=True)
class TaskResult:
    """A task's numbers: per template and across templates."""

    task: str
    language: str | None
    n: int
    """Items per template."""
    num_fewshot: int
    templates: tuple[TemplateResult, ...]
    aggregates: dict[str, Aggregate]

    def to_records(self) -> list[dict[str, Any]]:
        """Flat JSON-able records ``{task, metric, value, stderr, template, n}``: one per template
        and metric, then ``template: "mean"`` and ``template: "spread"`` (value: the sample
        standard deviation, plus ``min`` and ``max``) per metric."""
        out = []
        for r in self.templates:
            for m in METRICS:
                est = r.metrics[m]
                out.append(
                    {
                        "task": self.task,
                        "metric": m,
                        "value": est.value,
                        "stderr": est.stderr,
                        "template": r.template,
                        "n": r.n,
                    }
                )
        for m in METRICS:
            a = self.aggregates[m]
            out.append(
                {"task": self.task, "metric": m, "value": a.mean, "stderr": a.stderr, "template": "mean", "n": self.n}
            )
            out.append(
                {
                    "task": self.task,
                    "metric": m,
                    "value": a.std,
                    "stderr": None,
                    "template": "spread",
                    "n": self.n,
                    "min": a.min,
                    "max": a.max,
                }
            )
        return out

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"{self.task} ({self.n} items, {self.num_fewshot}-shot)"]
        for r in self.templates:
            cells = "  ".join(f"{m} {r.metrics[m].value:.4f} ± {r.metrics[m].stderr or 0:.4f}" for m in METRICS)
            lines.append(f"  {r.template:<16} {cells}")
        for m in METRICS:
            a = self.aggregates[m]
            std = f"{a.std:.4f}" if a.std is not None else "-"
            lines.append(f"  {m} mean {a.mean:.4f} ± {a.stderr or 0:.4f}, std {std}, range {a.min:.4f}-{a.max:.4f}")
        return "\n".join(lines)


def evaluate_task(task: Task, scorer: Scorer) -> TaskResult:
    """Ask every template of ``task`` through one call of ``scorer`` (it batches)."""
    return evaluate_tasks([task], scorer)[0]


def evaluate_tasks(tasks: Sequence[Task], scorer: Scorer) -> list[TaskResult]:
    """Ask every task through one call of ``scorer`` with all their pairs (none if no task)."""
    requests = [task.requests() for task in tasks]
    pairs = [(r.context, r.continuation) for reqs in requests for r in reqs]
    if not pairs:
        return []
    scores = scorer(pairs)
    if len(scores) != len(pairs):
        raise ValueError(f"the scorer returned {len(scores)} scores for {len(pairs)} pairs")
    out, at = [], 0
    for task, reqs in zip(tasks, requests, strict=True):
        out.append(task.result(scores[at : at + len(reqs)], reqs))
        at += len(reqs)
    return out


# --- reading YAML ---------------------------------------------------------------------------


class _Mapping(dict):
    """A YAML mapping that remembers its line and its keys' lines."""

    line = 0
    lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    out = _Mapping()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(None, None, "a key that is not a scalar", key_node.start_mark)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Loader)  # a SafeLoader that keeps line numbers
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such task file; expected a YAML task file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc}); expected a YAML task file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); expected a YAML task file") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        what = (exc.problem or exc.context or "a syntax error").strip().replace("\n", " ")
        raise ConfigError(f"{where}: not valid YAML ({what}); expected a task mapping") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); expected a task mapping") from None


def _build(cls: type, raw: Any, src: str, where: str, line: int) -> Any:
    """``cls(**raw)`` with every error one line ``<src>:<line>: <where><key>: ...``."""
    names = [f.name for f in dataclasses.fields(cls)]
    label = where.rstrip(".") or "the task"
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}:{line}: {label}: got {_show(raw)}; expected a mapping with keys {', '.join(names)}")
    lines = getattr(raw, "lines", {})
    line = getattr(raw, "line", line)
    for key in raw:
        if key not in names:
            raise ConfigError(
                f"{src}:{lines.get(key, line)}: {where}{key}: unknown key; expected one of {', '.join(names)}"
            )
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw:
            raise ConfigError(f"{src}:{line}: {where}{f.name}: missing; expected it in {label}")
    try:
        return cls(**raw)
    except _Invalid as exc:
        raise ConfigError(f"{src}:{lines.get(exc.key, line)}: {where}{exc}") from None


def _task_config(raw: Any, src: str) -> tuple[TaskConfig, dict[str, int]]:
    if raw is None:
        raise ConfigError(f"{src}: empty file; expected a task mapping (name, data, templates, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{src}: got {type(raw).__name__} at the top; expected a task mapping (name, data, templates)"
        )
    raw = _Mapping(raw) if not isinstance(raw, _Mapping) else raw
    lines = dict(getattr(raw, "lines", {}))
    values = _Mapping(raw)
    values.line, values.lines = getattr(raw, "line", 1), lines
    values.setdefault("name", Path(src).stem)
    templates = raw.get("templates")
    if isinstance(templates, list):
        values["templates"] = [
            _build(Template, t, src, f"templates[{i}].", lines.get("templates", 1)) for i, t in enumerate(templates)
        ]
        for i, t in enumerate(templates):  # where later errors about a template point
            lines[f"templates[{i}]"] = getattr(t, "line", lines.get("templates", 1))
    if "fields" in raw and raw["fields"] is not None:
        values["fields"] = _build(Fields, raw["fields"], src, "fields.", lines.get("fields", 1))
    base = os.path.dirname(src)
    for key in ("data", "fewshot_data"):
        if isinstance(raw.get(key), str) and raw[key]:
            values[key] = os.path.normpath(os.path.join(base, os.path.expanduser(raw[key])))
    return _build(TaskConfig, values, src, "", 1), lines


# --- reading data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    path: str
    rows: list[tuple[int, dict[str, Any]]]
    """(first line, row) per data row."""
    columns: tuple[str, ...]
    """Every column any row has (CSV: the header)."""
    is_csv: bool


def _read_table(path: str, src: str, key: str, line: int) -> _Table:
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ConfigError(f"{src}:{line}: {key}: {path} is not .jsonl or .csv; expected JSON lines (.jsonl) or a CSV")
    if not os.path.isfile(path):
        raise ConfigError(f"{src}:{line}: {key}: no such file {path}; expected a path relative to the task file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            table = _read_csv(f, path) if suffix == ".csv" else _read_jsonl(f, path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); expected a UTF-8 {suffix} file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); expected a readable {suffix} file") from None
    if not table.rows:
        raise DataError(f"{path}: no items; expected at least one {'row' if table.is_csv else 'JSON line'}")
    return table


def _read_jsonl(f, path: str) -> _Table:
    rows, columns = [], {}
    for n, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as exc:
            msg = getattr(exc, "msg", str(exc))
            raise DataError(f"{path}:{n}: not JSON ({msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: a JSON {type(row).__name__}; expected one JSON object per line")
        rows.append((n, row))
        columns.update(dict.fromkeys(row))
    return _Table(path, rows, tuple(columns), is_csv=False)


def _read_csv(f, path: str) -> _Table:
    reader = csv.reader(f, strict=True)
    rows: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            if header is None:
                header = cells
                dup = next((c for c in header if header.count(c) > 1), None)
                if dup is not None:
                    raise DataError(f"{path}:{line}: column {dup!r} twice in the header; expected unique column names")
                continue
            if len(cells) != len(header):
                raise DataError(f"{path}:{line}: {len(cells)} cells; expected {len(header)}, one per header column")
            rows.append((line, dict(zip(header, cells, strict=True))))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not CSV ({exc}); expected a CSV file with a header line") from None
    return _Table(path, rows, tuple(header or ()), is_csv=True)


def _text(value: Any) -> str | None:
    """A scalar cell as text (None: not a scalar)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _answer_as(fmt: str, value: Any, choices: Sequence[str]) -> int | None:
    """The answer's index read as ``fmt``, or None if it does not fit."""
    if fmt == "index":
        if _is_int(value):
            j = value
        elif isinstance(value, str) and value.strip().isdigit():
            j = int(value.strip())
        else:
            return None
        return j if 0 <= j < len(choices) else None
    if fmt == "letter":
        if isinstance(value, str) and len(value.strip()) == 1:
            j = LETTERS.find(value.strip().upper())
            return j if 0 <= j < len(choices) else None
        return None
    text = _text(value)
    return choices.index(text) if text in choices else None


ANSWER_NOUN = {"index": "an index", "letter": "a letter", "text": "a choice text"}
EXPECTED_ANSWER = {
    "index": "an index 0..{last}",
    "letter": "a letter A..{letter}",
    "text": "one of the item's choice texts",
}


def _resolve_answer_format(cfg: TaskConfig, src: str, answers: list[tuple[str, int, Any, tuple[str, ...]]]) -> str:
    """``auto`` -> the one format that fits every answer (or several that agree)."""
    if cfg.answer_format != "auto":
        return cfg.answer_format
    fits = {fmt: [_answer_as(fmt, v, c) for _, _, v, c in answers] for fmt in ("index", "letter", "text")}
    whole = [fmt for fmt, got in fits.items() if None not in got]
    if not whole:
        for k, (path, line, value, choices) in enumerate(answers):
            if all(fits[fmt][k] is None for fmt in fits):
                raise DataError(
                    f"{path}:{line}: answer {_show(value)} is no index, letter or text of its {len(choices)} choices; "
                    f"expected an index 0..{len(choices) - 1}, a letter A..{LETTERS[len(choices) - 1]} or a choice text"
                )
        best = max(fits, key=lambda fmt: sum(j is not None for j in fits[fmt]))
        k = fits[best].index(None)
        path, line, value, _ = answers[k]
        raise DataError(
            f"{path}:{line}: answer {_show(value)} is not {ANSWER_NOUN[best]} like most answers; expected "
            "answers in one format (or set answer_format)"
        )
    for other in whole[1:]:
        k = next((k for k, (a, b) in enumerate(zip(fits[whole[0]], fits[other], strict=True)) if a != b), None)
        if k is not None:
            path, line, value, _ = answers[k]
            raise ConfigError(
                f"{src}: answer_format: auto is ambiguous ({path}:{line}: answer {_show(value)} reads as choice "
                f"{fits[whole[0]][k]} as {whole[0]} but {fits[other][k]} as {other}); expected answer_format: "
                f"{whole[0]} or {other}"
            )
    return whole[0]


def _items(cfg: TaskConfig, src: str, lines: Mapping[str, int], table: _Table) -> list[tuple]:
    """Each row as (line, row text, choices, raw answer), checked against the fields and templates."""
    fm, path = cfg.field_map, table.path
    columns = cfg.choice_columns
    where = f"layout {cfg.layout} ({LAYOUT_COLUMNS[cfg.layout]})" if cfg.layout else "fields"
    needed = [fm.question] if cfg.layout else []  # a layout names all its columns
    needed += ([columns] if isinstance(columns, str) else list(columns or ())) + [fm.answer]
    for col in needed:
        if col not in table.columns:
            raise ConfigError(
                f"{src}:{lines.get('layout' if cfg.layout else 'fields', 1)}: {where}: {path} has no "
                f"column {col!r}; expected one of its columns {_columns(table)}"
            )
    if table.is_csv and isinstance(columns, str):
        raise ConfigError(
            f"{src}:{lines.get('fields', 1)}: fields.choices: one CSV column cannot hold a list; "
            "expected a list of columns such as [A, B, C, D], or fixed_choices"
        )
    uses: dict[str, str] = {}  # column -> a template that reads it
    for ti, t in enumerate(cfg.templates):
        for name in t.used_fields():
            col = fm.question if name == "question" else name
            if name in PROMPT_HELPERS and name != "question":
                continue
            if col not in table.columns:
                what = f"{{question}} (fields.question: {col!r})" if name == "question" else f"{{{name}}}"
                raise ConfigError(
                    f"{src}:{_template_line(lines, ti)}: template {t.name!r}: {what} is not a column of {path}; "
                    f"expected one of its columns {_columns(table)} or a helper ({', '.join(PROMPT_HELPERS)})"
                )
            uses.setdefault(col, t.name)
    out = []
    for line, row in table.rows:
        text: dict[str, str] = {}
        for col, value in row.items():
            if (s := _text(value)) is not None:
                text[col] = s
        for col, tname in uses.items():
            if col not in row or row[col] is None:
                raise DataError(
                    f"{path}:{line}: no {col!r} field, which template {tname!r} of {src} uses; expected it in every row"
                )
            if col not in text:
                raise DataError(
                    f"{path}:{line}: field {col!r} is {_show(row[col])}, which template {tname!r} "
                    "shows; expected a string or a number"
                )
        if cfg.fixed_choices is not None:
            choices = cfg.fixed_choices
        elif isinstance(columns, str):
            value = row.get(columns)
            texts = [_text(v) for v in value] if isinstance(value, list) else []
            if len(texts) < 2 or any(t is None or t == "" for t in texts):
                raise DataError(
                    f"{path}:{line}: field {columns!r} is {_show(value)}; expected a list of >= 2 "
                    "non-empty choice texts"
                )
            choices = tuple(t for t in texts if t is not None)
        else:
            assert columns is not None
            for col in columns:
                if col not in row or not _text(row[col]):
                    raise DataError(
                        f"{path}:{line}: choice column {col!r} is {_show(row.get(col))}; expected a "
                        "non-empty choice text"
                    )
            choices = tuple(str(_text(row[col])) for col in columns)
        if len(choices) > len(LETTERS):
            raise DataError(f"{path}:{line}: {len(choices)} choices; expected at most {len(LETTERS)}")
        if fm.answer not in row:
            raise DataError(f"{path}:{line}: no {fm.answer!r} field; expected the answer in every row")
        out.append((line, text, choices, row[fm.answer]))
    return out


def _template_line(lines: Mapping[str, int], index: int) -> int:
    return lines.get(f"templates[{index}]", lines.get("templates", 1))


def _columns(table: _Table) -> str:
    cols = ", ".join(repr(c) for c in table.columns[:12])
    return f"({cols}{', ...' if len(table.columns) > 12 else ''})"


def load_task(path: str | os.PathLike) -> Task:
    """Read and check a task file and its data: every template is rendered on every item once,
    so a task that loads can be asked."""
    src = os.fspath(path)
    cfg, lines = _task_config(_read_yaml(src), src)
    return build_task(cfg, src, lines)


def build_task(cfg: TaskConfig, source: str = "<task>", lines: Mapping[str, int] | None = None) -> Task:
    """A task from a built configuration (its paths as they are: relative ones from the working
    directory). ``source`` and ``lines`` (key -> line) name where the configuration came from."""
    src, lines = source, lines or {}
    data = _read_table(cfg.data, src, "data", lines.get("data", 1))
    tables = [data]
    if cfg.fewshot_data is not None and os.path.normpath(cfg.fewshot_data) != os.path.normpath(cfg.data):
        tables.append(_read_table(cfg.fewshot_data, src, "fewshot_data", lines.get("fewshot_data", 1)))
    parsed = [(table.path, _items(cfg, src, lines, table)) for table in tables]
    answers = [(p, line, raw, choices) for p, rows in parsed for line, _, choices, raw in rows]
    fmt = _resolve_answer_format(cfg, src, answers)
    built: list[list[Item]] = []
    for p, rows in parsed:
        items = []
        for line, text, choices, raw in rows:
            j = _answer_as(fmt, raw, choices)
            if j is None:
                expected = EXPECTED_ANSWER[fmt].format(last=len(choices) - 1, letter=LETTERS[len(choices) - 1])
                raise DataError(
                    f"{p}:{line}: answer {_show(raw)} does not fit answer_format {fmt}; expected {expected}"
                )
            key = (
                (text.get(cfg.field_map.question), choices)
                if cfg.field_map.question in text
                else (tuple(sorted(text.items())), choices)
            )
            items.append(Item(source=p, line=line, row=text, choices=choices, answer=j, key=key))
        built.append(items)
    asked = built[0][: cfg.limit] if cfg.limit is not None else built[0]
    pool = built[1] if len(built) > 1 else built[0]
    available = len(pool) - (0 if len(built) > 1 else 1)
    if cfg.num_fewshot > available:
        raise ConfigError(
            f"{src}:{lines.get('num_fewshot', 1)}: num_fewshot: {cfg.num_fewshot} examples but "
            f"{pool[0].source} offers {available}; expected num_fewshot <= {available}"
        )
    task = Task(config=cfg, source=src, items=tuple(asked), fewshot_pool=tuple(pool))
    _check_renders(task, lines)
    return task


def _check_renders(task: Task, lines: Mapping[str, int]) -> None:
    """Every template on every item (and on the few-shot pool), so errors surface at load."""
    src = task.source
    for ti, t in enumerate(task.config.templates):
        line = _template_line(lines, ti)
        for item in (*task.items, *task.fewshot_pool):
            if t.verbalizer is not None and len(t.verbalizer) != len(item.choices):
                raise ConfigError(
                    f"{src}:{line}: template {t.name!r}: verbalizer has {len(t.verbalizer)} words "
                    f"but {item.source}:{item.line} has {len(item.choices)} choices; expected one word "
                    "per choice"
                )
            try:
                task._fill(t.description, t, item)
                task._fill(t.prompt, t, item)
                conts = [task._choice(t, item, j) for j in range(len(item.choices))]
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(
                    f"{src}:{line}: template {t.name!r} fails on {item.source}:{item.line} "
                    f"({type(exc).__name__}: {exc}); expected text str.format can fill"
                ) from None
            if "" in conts:
                raise ConfigError(
                    f"{src}:{line}: template {t.name!r}: a choice of {item.source}:{item.line} "
                    "renders empty; expected a non-empty continuation"
                )
            if len(set(conts)) < len(set(item.choices)):  # duplicates in the data itself are the data's
                raise ConfigError(
                    f"{src}:{line}: template {t.name!r}: different choices of {item.source}:{item.line} read the "
                    "same; expected a continuation per choice that tells them apart"
                )
    for i in range(len(task.items)):
        task.fewshot(i)


def shipped_tasks() -> list[str]:
    """Names of the example tasks that ship with megatron-ct."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_tasks(paths_or_names: Iterable[str | os.PathLike]) -> list[Task]:
    """Tasks from YAML files, directories (every ``*.yaml`` in them) or shipped names (``zh_sentiment``)."""
    if isinstance(paths_or_names, (str, os.PathLike)):
        paths_or_names = [paths_or_names]
    tasks: list[Task] = []
    for entry in paths_or_names:
        text = os.fspath(entry)
        if os.path.isdir(text):
            files = sorted(Path(text).glob("*.yaml")) + sorted(Path(text).glob("*.yml"))
            if not files:
                raise ConfigError(f"{text}: a directory without *.yaml task files; expected task files in it")
            tasks += [load_task(p) for p in files]
        elif os.path.isfile(text) or text.endswith((".yaml", ".yml")) or os.sep in text:
            tasks.append(load_task(text))
        elif (TASKS_DIR / f"{text}.yaml").is_file():
            tasks.append(load_task(TASKS_DIR / f"{text}.yaml"))
        else:
            raise ConfigError(
                f"{text}: no such task; expected a YAML file, a directory of them, or a shipped task "
                f"({', '.join(shipped_tasks())})"
            )
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise ConfigError(f"{t.source}: task name {t.name!r} is also {seen[t.name]}'s; expected unique task names")
        seen[t.name] = t.source
    return tasks


__all__ = [
    "Aggregate",
    "Estimate",
    "Fields",
    "Item",
    "Request",
    "Scorer",
    "Task",
    "TaskConfig",
    "TaskResult",
    "Template",
    "TemplateResult",
    "build_task",
    "evaluate_task",
    "evaluate_tasks",
    "load_task",
    "load_tasks",
    "placeholders",
    "shipped_tasks",
]
