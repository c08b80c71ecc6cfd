"""Every recipe in examples/ loads and fits the layout it documents."""

from pathlib import Path

import pytest

from megatron_ct.config import load_config, validate_for_world

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORLD = {
    "tiny_cpu_tp2pp2.yaml": 4,
    "llama2_7b_ct_bf16.yaml": 32,
    "curriculum_3stage.yaml": 1,
    "llama2_13b_zh_ct_3stage.yaml": 64,
    "llama2_7b_long_context_yarn.yaml": 16,
    "long_context/smollm2_16k.yaml": 1,
}


@pytest.mark.parametrize("name", sorted(WORLD))
def test_recipe_is_valid(name):
    cfg = load_config(str(EXAMPLES / name))
    validate_for_world(cfg, WORLD[name])


def test_every_recipe_is_listed():
    assert {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.yaml")} <= set(WORLD)
