"""Named sections of a generated Markdown file that other scripts own.

``asrkd bench`` rewrites BENCHMARKS.md from its own measurements; other benchmark scripts
(``benchmarks/shards.py``, ``benchmarks/gpu_check.sh``) measure things it does not. Each of
those writes its part between ``<!-- section:NAME -->`` and ``<!-- /section:NAME -->`` with
:func:`update_section`, and the bench keeps such sections when it rewrites the file
(:func:`carry_sections`), so neither overwrites the other's figures.
"""

from __future__ import annotations

import re
from pathlib import Path

_SECTION = re.compile(r"<!-- section:(?P<name>[\w-]+) -->\n.*?<!-- /section:(?P=name) -->\n?",
                      re.DOTALL)


def _block(name: str, body: str) -> str:
    return f"<!-- section:{name} -->\n{body.rstrip()}\n<!-- /section:{name} -->\n"


def update_section(path: str | Path, name: str, body: str) -> None:
    """Replace section ``name`` of the Markdown file ``path`` with ``body`` (appended at the
    end when absent; the file is created if missing)."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    block = _block(name, body)
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->\n.*?<!-- /section:"
                         rf"{re.escape(name)} -->\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text)


def carry_sections(old: str, new: str) -> str:
    """``new`` with every named section of ``old`` that ``new`` lacks appended, in order."""
    have = {m.group("name") for m in _SECTION.finditer(new)}
    kept = [m.group(0).rstrip("\n") + "\n" for m in _SECTION.finditer(old)
            if m.group("name") not in have]
    if not kept:
        return new
    return new.rstrip("\n") + "\n\n" + "\n".join(kept)
