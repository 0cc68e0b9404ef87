"""Install hints name extras that exist: every `pip install` in lmforge's source suggests
`lmforge[EXTRA,...]`, and every `lmforge[...]` written there and in the README's commands names
extras that pyproject.toml defines."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from lmforge.data.readers import require_pyarrow
from lmforge.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PIP_INSTALL = re.compile(r"pip install\s+(?:-e\s+)?(\S+)")
EXTRAS = re.compile(r"""(['"]?)(?:lmforge|\.)\[([^\]]*)\]\1""")  # 'lmforge[a,b]' or ".[a]" (an editable install)


def defined_extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return set(project.get("optional-dependencies", {}))


def install_hints(text: str) -> list[str]:
    """The word after each `pip install` in `text`, quotes and what closes the sentence included."""
    return PIP_INSTALL.findall(text)


def test_the_hint_parser_reads_what_the_code_writes():
    assert install_hints("needs gguf: pip install 'lmforge[gguf]'") == ["'lmforge[gguf]'"]
    assert install_hints('pip install -e ".[dev]"') == ['".[dev]"']
    assert EXTRAS.match(install_hints("(`pip install 'lmforge[hf,gguf]'`) and")[0]).group(2) == "hf,gguf"
    assert not EXTRAS.match("pyarrow")


@pytest.mark.parametrize("where", ["lmforge", "README.md"])
def test_every_install_hint_names_existing_extras(where):
    extras = defined_extras()
    assert {"dev", "gguf", "parquet"} <= extras
    path = ROOT / where
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    hints = [(file, hint) for file in files for hint in install_hints(file.read_text(encoding="utf-8"))]
    if where == "lmforge":
        assert len(hints) >= 3  # gguf and pyarrow at least: the scan does see the code's hints
    for file, hint in hints:
        if where == "README.md" and not hint.strip("'\"").startswith((".", "lmforge")):
            continue  # the README installs torch itself
        match = EXTRAS.match(hint)
        assert match, f"{file.relative_to(ROOT)}: `pip install {hint}` does not name an lmforge extra"
        named = {e.strip() for e in match.group(2).split(",")}
        assert named <= extras, f"{file.relative_to(ROOT)}: {hint} names {named - extras}; extras: {sorted(extras)}"
    for file in files:  # and `lmforge[...]` wherever else it is written
        for names in re.findall(r"\blmforge\[([\w,\s-]*)\]", file.read_text(encoding="utf-8")):
            named = {e.strip() for e in names.split(",")}
            assert named <= extras, f"{file.relative_to(ROOT)}: lmforge[{names}] names {named - extras}"


def test_a_missing_pyarrow_names_the_parquet_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"reading .*data.parquet needs pyarrow: pip install 'lmforge\[parquet\]'"):
        require_pyarrow(tmp_path / "data.parquet")
