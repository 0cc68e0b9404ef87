"""Run one of lmforge's training functions with slowed-down steps, so a test can kill it between two steps.

    python tests/scripts/run_verb.py lmforge.recipes.finetune:finetune '{"model": "...", ...}' --step-sleep 0.3

The steps themselves are unchanged (the real Trainer, model, data and optimizer); each one is only
followed by a pause. The subject of the resume-after-kill tests (tests/test_resume.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

from lmforge.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("function", help="module:function, e.g. lmforge.recipes.finetune:finetune")
    p.add_argument("kwargs", help="its keyword arguments, as JSON")
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    step = Trainer.train_step

    def slow_step(self):
        loss = step(self)
        time.sleep(args.step_sleep)
        return loss

    Trainer.train_step = slow_step
    module, name = args.function.split(":")
    getattr(importlib.import_module(module), name)(**json.loads(args.kwargs))


if __name__ == "__main__":
    main()
