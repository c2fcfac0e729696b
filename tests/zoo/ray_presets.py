"""Presets that Ray workers of the zoo tests import (tests/zoo is on their PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

from loralens.zoo.presets.skills_lm import SkillsLM

#: created in the zoo folder by the first attempt of :class:`ExitOnceSkillsLM`, just before it dies
MARKER = "worker-killed-once"


class ExitOnceSkillsLM(SkillsLM):
    """skills-lm whose worker process exits abruptly (``os._exit``, no cleanup) right after
    committing LoRA ``exit_after``, the first time only: a worker lost mid-task."""

    exit_after = "000001"

    def train(self, configs, out_dirs, on_done=None):
        zoo = Path(out_dirs[0]).parent.parent

        def done(k, labels):
            on_done(k, labels)
            if Path(out_dirs[k]).name.split("-")[1] == self.exit_after:
                try:
                    (zoo / MARKER).touch(exist_ok=False)
                except FileExistsError:
                    return
                os._exit(1)

        return super().train(configs, out_dirs, on_done=done)


class FailingSkillsLM(SkillsLM):
    """skills-lm whose ``train`` raises, every time, for the group holding LoRA ``fails``
    (before it commits any of them): a task that fails for good."""

    fails = "000005"

    def train(self, configs, out_dirs, on_done=None):
        if any(Path(d).name.split("-")[1] == self.fails for d in out_dirs):
            raise RuntimeError(f"planted failure of LoRA {self.fails}\nwith a second line")
        return super().train(configs, out_dirs, on_done=on_done)
