"""Only what pyproject.toml cannot say: `lmforge-lm-eval.pth`, installed beside the package, lets the `lm_eval`
command find lmforge's harness backend (`lm_eval --model lmforge`): when, and only when, the running program is
`lm_eval`, it imports `lmforge.eval.harness`, which registers the backend. Every other program pays one check."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "lmforge-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):  # pip install -e .: the file goes into the editable wheel too
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(PTH, os.path.join(unpacked_wheel, PTH))
        return result


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
