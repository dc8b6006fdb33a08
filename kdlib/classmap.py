"""Which teacher output stands for which class of the data: never a silent misalignment.

A teacher's classes are the data's when the counts agree and nothing says otherwise. When
they do not (a 1000-class ImageNet teacher over a 10-class folder of ImageNet classes, or an
ImageNet validation subset), the data's classes are mapped to teacher outputs, by a
``--class-map`` file or by the teacher's own class names; the teacher then answers over the
data's classes only (its logits restricted to the mapped outputs, in the data's order). Any
class that cannot be mapped is refused, naming it.

A class-map file is JSON, ``{"<data class>": <teacher index> or "<teacher class name>", ...}``,
or text lines ``<data class><TAB><teacher index or name>``. Every data class must appear once,
and no two data classes may share a teacher output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import ModelError

__all__ = ["resolve_class_map", "read_class_map"]


def _key(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


def _aliases(names: Sequence[str]) -> list[str]:
    out = []
    for n in names:  # "tench, Tinca tinca": the whole description and its first part both count
        out += [_key(n), _key(str(n).split(",")[0])]
    return out


def read_class_map(path: str) -> dict[str, int | str]:
    """A --class-map JSON file: {data class: teacher index or class name}, checked."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelError(f"cannot read class map {p}: {e.strerror or e}") from None
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ModelError(f"class map {p} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not all(
            isinstance(v, (int, str)) and not isinstance(v, bool) for v in data.values()
        ):
            raise ModelError(f'class map {p}: want a JSON object {{"data class": teacher index or name}}')
        return {str(k): v for k, v in data.items()}
    out: dict[str, int | str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise ModelError(f"class map {p} line {n}: want '<data class><TAB><teacher index or name>'")
        cls, target = (s.strip() for s in line.split("\t", 1))
        if cls in out:
            raise ModelError(f"class map {p} line {n}: data class {cls!r} appears twice")
        out[cls] = int(target) if target.lstrip("-").isdigit() else target
    return out


def resolve_class_map(
    data_classes: Sequence[str],
    teacher_classes: int,
    teacher_names: list[list[str]] | None,
    class_map: str | None,
    spec: str,
) -> tuple[list[int] | None, str]:
    """-> (teacher output index of each data class, or None for the identity; how it was decided)."""
    data_classes = list(data_classes)
    if class_map is not None:
        return _from_file(data_classes, teacher_classes, teacher_names, class_map, spec), f"class map {class_map}"
    if teacher_names is not None:
        found = _by_name(data_classes, teacher_names)
        if all(i is not None for i in found) and len(set(found)) == len(found):
            index = [int(i) for i in found]
            if index == list(range(teacher_classes)):
                return None, "the teacher's class names (same order)"
            return index, "the teacher's class names"
    if teacher_classes == len(data_classes):
        how = (
            "position (the teacher has no class names)"
            if teacher_names is None
            else "position (the folder's names are not the teacher's class names)"
        )
        return None, how
    missing = (
        [c for c, i in zip(data_classes, _by_name(data_classes, teacher_names or [])) if i is None]
        if teacher_names
        else []
    )
    why = (
        f"; not among the teacher's class names: {_head(missing)}"
        if missing
        else "; the teacher has no class names"
        if teacher_names is None
        else ""
    )
    raise ModelError(
        f"teacher {spec} has {teacher_classes} classes, the data has {len(data_classes)} "
        f'({_head(data_classes)}){why}. Give --class-map FILE (JSON {{"data class": teacher index '
        "or class name}) so each data class maps to one teacher output"
    )


def _head(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(c) for c in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _by_name(data_classes: list[str], teacher_names: list[list[str]]) -> list[int | None]:
    table: dict[str, int] = {}
    ambiguous = set()
    for i, names in enumerate(teacher_names):
        for a in set(_aliases(names)):
            if a in table and table[a] != i:
                ambiguous.add(a)
            table.setdefault(a, i)
    return [None if _key(c) in ambiguous else table.get(_key(c)) for c in data_classes]


def _from_file(
    data_classes: list[str], teacher_classes: int, teacher_names: list[list[str]] | None, path: str, spec: str
) -> list[int]:
    mapping = read_class_map(path)
    unknown = sorted(set(mapping) - set(data_classes))
    if unknown:
        raise ModelError(f"class map {path} names {_head(unknown)}, not classes of the data ({_head(data_classes)})")
    missing = [c for c in data_classes if c not in mapping]
    if missing:
        raise ModelError(f"class map {path} lacks data class(es) {_head(missing)}; every class needs a teacher output")
    index = []
    for c in data_classes:
        target = mapping[c]
        if isinstance(target, str):
            i = _by_name([target], teacher_names)[0] if teacher_names else None
            if i is None:
                raise ModelError(
                    f"class map {path}: {c!r} -> {target!r} is not a class name of teacher {spec}"
                    + (" (it has none: use an output index)" if teacher_names is None else "")
                )
        else:
            i = int(target)
            if not 0 <= i < teacher_classes:
                raise ModelError(f"class map {path}: {c!r} -> {i} is outside the teacher's 0..{teacher_classes - 1}")
        index.append(i)
    dup = sorted({c for c, i in zip(data_classes, index) if index.count(i) > 1})
    if dup:
        raise ModelError(f"class map {path}: data classes {_head(dup)} share one teacher output")
    return index
