"""One entry point for metadata from any model source (local, hub, https)."""

from __future__ import annotations

from pathlib import Path

from clusterctl.errors import MetadataError
from clusterctl.models import gguf_reader, hf_config, remote
from clusterctl.models.meta import ModelMeta


def read_meta(source: str, *, format: str | None = None, token: str | None = None,
              endpoint: str | None = None) -> ModelMeta:
    """Metadata of `source`: a .gguf (local, hf://, https://) or a safetensors/MLX repo or folder."""
    src = remote.parse_source(source)
    is_gguf = format == "gguf" or (format is None and src.filename.endswith(".gguf"))
    if src.scheme == "file":
        path = Path(src.path)
        if not path.exists():
            raise MetadataError(f"no such file or folder: {path}")
        if path.name == "config.json" and not is_gguf:  # a Hugging Face folder named by its config
            path = path.parent
        if path.is_dir():
            return hf_config.read_local_hf_dir(path, format=None if format == "gguf" else format)  # type: ignore[arg-type]
        if not is_gguf and path.suffix == ".json":
            return load_meta_json(path)
        return gguf_reader.read_local(path)
    if is_gguf:
        return remote.read_remote(src, token=token, endpoint=endpoint)
    if src.scheme != "hf":
        raise MetadataError(f"{source}: only .gguf files are read over plain https",
                            "for a safetensors/MLX model use hf://org/repo")
    return hf_config.read_hf_config(src, token=token, endpoint=endpoint,
                                    format=format if format in ("safetensors", "mlx") else None)  # type: ignore[arg-type]


def load_meta_json(path: Path) -> ModelMeta:
    """A file written by `clusterctl inspect --json`."""
    import json

    from pydantic import ValidationError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelMeta.model_validate(data.get("meta", data))
    except (OSError, ValueError, RecursionError, ValidationError, AttributeError) as exc:  # ValueError: JSON, UTF-8
        raise MetadataError(f"{path} is not model metadata: {str(exc).splitlines()[0]}",
                            "write it with `clusterctl inspect MODEL --json`") from None
