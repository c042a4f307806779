"""``bigtrain train --help`` lists every config key with its default and its docstring."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from bigtrain.config import Config


def _keys(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            out += _keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f.default if f.default is not dataclasses.MISSING else f.default_factory()))
    return out


def test_train_help_lists_every_key_with_its_default_and_docstring():
    text = subprocess.run([sys.executable, "-m", "bigtrain", "train", "--help"], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    lines = text.splitlines()
    keys = _keys(Config)
    assert len(keys) > 50
    for key, default in keys:
        entry = [i for i, line in enumerate(lines) if line.startswith(f"  {key} [")]
        assert len(entry) == 1, f"{key} is not listed once in bigtrain train --help"
        i = entry[0]
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else None
        if shown is not None:
            assert lines[i].endswith(f"[{shown}]"), lines[i]
        assert lines[i + 1].startswith("      ") and len(lines[i + 1].strip()) > 10, f"{key} has no docstring"
    assert "train.steps [200]" in text and "optim.lr [0.001]" in text
