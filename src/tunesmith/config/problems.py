"""pydantic's validation errors as Problems: a YAML path, what is wrong, and a hint."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from ..errors import Problem, suggest
from .schema import RunConfig


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "DataConfig", "literal['sft']"):
            continue  # union branch names pydantic adds to locations
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def problems_from(err: ValidationError, model: type[BaseModel] | None = None, prefix: str = ""
                  ) -> list[Problem]:
    """pydantic's errors as Problems with YAML paths (`prefix` + the location inside `model`)."""
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for e in err.errors():
        msg = str(e.get("msg", ""))
        loc = _loc(tuple(e["loc"]))
        where = f"{prefix}.{loc}" if prefix and loc != "(top level)" else (prefix or loc)
        hint = None
        if e["type"] == "extra_forbidden":
            what = "unknown key"
            parent = _section_for(tuple(e["loc"][:-1]), model or RunConfig)
            if parent is not None:
                hint = suggest(str(e["loc"][-1]), parent.model_fields)
        else:
            what = msg
            if e["type"].startswith("literal_error"):
                hint = "choose one of the listed values"
            elif "type" in e["type"] or e["type"].endswith("_parsing"):
                hint = f"got {e.get('input')!r}"
        if (where, what) not in seen:
            seen.add((where, what))
            problems.append(Problem(where, what, hint))
    return problems


def _section_for(loc: tuple, model: type[BaseModel]) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        found = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            for inner in (cand, *getattr(cand, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    found = inner
        if found is None:
            return None
        model = found
    return model
