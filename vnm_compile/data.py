"""Real English text with no network: Python standard-library docstrings.

Calibration and evaluation draw from disjoint sets of modules, so held-out
text is never seen during calibration or recovery training.
"""

from __future__ import annotations

import importlib
import inspect

__all__ = [
    "CALIBRATION_MODULES",
    "EVALUATION_MODULES",
    "docstring_texts",
    "add_paragraphs",
    "calibration_and_eval_texts",
]

CALIBRATION_MODULES = (
    "collections", "json", "re", "os", "itertools", "functools", "subprocess", "argparse",
    "logging", "pathlib", "threading", "socket", "email.message", "http.client", "zipfile",
    "tarfile", "asyncio.tasks", "unittest.case", "decimal", "fractions",
)  # fmt: skip
EVALUATION_MODULES = (
    "string", "textwrap", "datetime", "random", "statistics", "heapq", "csv", "shutil",
    "typing", "calendar", "difflib", "pprint", "sched", "queue", "configparser", "tempfile",
    "gzip", "bisect", "fileinput", "contextlib",
)  # fmt: skip


def _paragraphs(doc: str | None) -> list[str]:
    if not doc:
        return []
    paras = [" ".join(p.split()) for p in doc.split("\n\n")]
    return [p for p in paras if len(p) >= 40 and not p.startswith((">>>", "..."))]


def docstring_texts(modules: tuple[str, ...], limit: int | None = None, max_chars: int = 600) -> list[str]:
    """Paragraphs of the docstrings of ``modules`` and their public members, deduplicated, in a fixed order.

    Args:
        modules: importable standard-library module names.
        limit: keep at most this many paragraphs.
        max_chars: paragraphs are cut to this many characters.
    """
    seen: set[str] = set()
    texts: list[str] = []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        if add_paragraphs(objs, texts, seen, max_chars, limit):
            break
    return texts


def add_paragraphs(
    objs: list, texts: list[str], seen: set[str], max_chars: int = 600, limit: int | None = None
) -> bool:
    """Append the docstring paragraphs of ``objs`` not in ``seen`` to ``texts`` (cut to ``max_chars``;
    ``seen`` updated). True when ``texts`` reached ``limit``."""
    for obj in objs:
        try:
            doc = inspect.getdoc(obj)
        except Exception:  # noqa: BLE001 - some members raise on attribute access
            continue
        for para in _paragraphs(doc):
            para = para[:max_chars]
            if para not in seen:
                seen.add(para)
                texts.append(para)
                if limit is not None and len(texts) >= limit:
                    return True
    return False


def calibration_and_eval_texts(
    n_calibration: int | None = None, n_eval: int | None = None
) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation paragraphs (evaluation drops any paragraph also in calibration)."""
    calib = docstring_texts(CALIBRATION_MODULES)
    seen = set(calib)
    held_out = [t for t in docstring_texts(EVALUATION_MODULES) if t not in seen]
    return calib[:n_calibration], held_out[:n_eval]
