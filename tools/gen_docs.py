"""Generates the reference parts of docs/ from the code, so they cannot drift.

    python tools/gen_docs.py          # rewrite docs/inventory-reference.md, docs/metadata-schema.json
    python tools/gen_docs.py --check  # exit 1 when a generated file is out of date (run by the tests)
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from clusterctl.inventory import (
    Accelerator,
    Cluster,
    Container,
    Defaults,
    Engines,
    HealthCheck,
    HuggingFace,
    Inventory,
    LlamaCppBuild,
    Model,
    Node,
    PythonEngine,
    Router,
    SecretRef,
    Service,
    SSHDefaults,
)
from clusterctl.models.meta import ModelMeta

ROOT = Path(__file__).resolve().parent.parent

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", Inventory), ("cluster", Cluster), ("cluster.ssh", SSHDefaults),
    ("cluster.huggingface", HuggingFace), ("cluster.defaults", Defaults), ("cluster.engines", Engines),
    ("cluster.engines.llama_cpp_build", LlamaCppBuild), ("cluster.engines.vllm / mlx_lm / exo", PythonEngine),
    ("nodes.NAME", Node), ("nodes.NAME.accelerators[]", Accelerator),
    ("models.NAME", Model), ("services.NAME", Service), ("services.NAME.container", Container),
    ("router", Router), ("router.health", HealthCheck), ("secret reference (api_key, token)", SecretRef),
]


def _type_name(ann: typing.Any) -> str:
    text = str(ann).replace("typing.", "")
    for prefix in ("clusterctl.inventory.", "pydantic.functional_validators."):
        text = text.replace(prefix, "")
    if "BeforeValidator(func=<function _size" in text:
        return "size (e.g. '80GiB')" + (" | None" if "None" in text else "")
    if "_duration" in text:
        return "duration (e.g. '5s')"
    if "check_name" in text:
        return "name"
    text = text.replace("<class '", "").replace("'>", "")
    return text


def inventory_reference() -> str:
    lines = [
        "# Inventory reference",
        "",
        "Generated from the schema by `python tools/gen_docs.py`; do not edit by hand.",
        "Sizes are strings with units: `GiB`/`MiB` are binary (2^30, 2^20 bytes), `GB`/`MB` decimal.",
        "Names (nodes, models, services, task types) match `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most",
        "63 characters, no `..`. Unknown keys are errors (with a did-you-mean).",
        "",
    ]
    for title, model in SECTIONS:
        lines += [f"## {title}", "", "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if name == "path":
                continue
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = "`" + json.dumps(field.default_factory(), default=str) + "`"  # type: ignore[call-arg]
            elif isinstance(field.default, BaseModel):
                default = "(section)"
            else:
                default = f"`{json.dumps(field.default)}`"
            desc = (field.description or "").replace("|", "\\|")
            funcs = {getattr(getattr(m, "func", None), "__name__", "") for m in field.metadata}
            ty = _type_name(field.annotation)
            if "_size" in funcs:
                ty = "size, e.g. '80GiB'" + (" or null" if "None" in ty else "")
            elif "_duration" in funcs:
                ty = "duration, e.g. '5s'"
            ty = ty.replace("|", "\\|")
            lines.append(f"| `{name}` | {ty} | {default} | {desc} |")
        lines.append("")
    return "\n".join(lines)


def metadata_schema() -> str:
    return json.dumps(ModelMeta.model_json_schema(), indent=2, sort_keys=True) + "\n"


OUTPUTS = {
    ROOT / "docs" / "inventory-reference.md": inventory_reference,
    ROOT / "docs" / "metadata-schema.json": metadata_schema,
}


def main(argv: list[str]) -> int:
    stale = []
    for path, make in OUTPUTS.items():
        text = make()
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python tools/gen_docs.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
