"""Entry point for tests: pretrain_ct.py with one rank slowed down, chosen by CT_SLOW_RANK.

CT_SLOW_RANK=R:S  rank R sleeps S seconds in every micro-batch's forward step (a slow GPU, a
                  throttled host): its compute time per step grows, the others wait for it.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import megatron_ct.training.step as step  # noqa: E402

rank, seconds = os.environ["CT_SLOW_RANK"].split(":")
if int(os.environ.get("RANK", "0")) == int(rank):
    forward_step = step.forward_step

    def slow_forward_step(data_iterator, model):
        time.sleep(float(seconds))
        return forward_step(data_iterator, model)

    step.forward_step = slow_forward_step

import pretrain_ct  # noqa: E402

sys.exit(pretrain_ct.main())
