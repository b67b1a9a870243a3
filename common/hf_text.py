"""A Hugging Face text tower's own files, found offline: its transformers config and tokenizer.

open_clip's multilingual models (`xlm-roberta-base-ViT-B-32`, `xlm-roberta-large-ViT-H-14`, ...)
have a transformers model as text tower (`HFTextEncoder`, text_cfg `hf_model_name`). Building
one calls `AutoConfig.from_pretrained(hf_model_name)`, which asks the Hugging Face hub for
`config.json` (offline: 5 retries, ~26 s, then an error), and its tokenizer reads
`hf_tokenizer_name`'s files the same way. An artifact therefore carries both:

    TEXT_CONFIG_DIR/config.json   the tower's transformers config (`write_text_config`)
    tokenizer.json, ...           the tokenizer's files (HF_TOKENIZER_FILES), which open_clip's
                                  `get_tokenizer("local-dir:ARTIFACT")` reads from the folder

and every place that builds such a model passes open_clip `text_cfg_override(...)`: the same
text_cfg with `hf_model_name` pointing at that local config. The artifact's own
open_clip_config.json keeps the original name (`xlm-roberta-base`), so plain open_clip loads it
as before where the hub (or its cache) is reachable.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEXT_CONFIG_DIR = "hf_text_config"
# The files a Hugging Face tokenizer may consist of; open_clip's HFTokenizer reads them from the
# artifact folder itself when the artifact is loaded with `local-dir:`.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


class HfTextFilesError(ValueError):
    """A Hugging Face text tower whose config or tokenizer files are nowhere on this machine."""


def hf_model_name(model_cfg: dict[str, Any]) -> str:
    """The text tower's transformers model name ('' for open_clip's own text transformer)."""
    return str(model_cfg.get("text_cfg", {}).get("hf_model_name") or "")


def text_cfg_override(model_cfg: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """open_clip `create_model` keyword arguments that build the text tower offline: {} for a
    tower of open_clip's own, else {"text_cfg": ...} with `hf_model_name` a local config folder.

    `hf_model_pretrained` is off: the tower's weights come from the CLIP weights loaded next,
    never from the hub (open_clip sets it the same way when it finds a weights file)."""
    name = hf_model_name(model_cfg)
    if not name:
        return {}
    config_dir = find_text_config(name, folder)
    text_cfg = dict(model_cfg["text_cfg"], hf_model_name=str(config_dir))
    text_cfg["hf_model_pretrained"] = False
    return {"text_cfg": text_cfg}


def find_text_config(name: str, folder: Path | None) -> Path:
    """The local folder holding `name`'s transformers config.json, looked for in this order:
    FOLDER/hf_text_config (an artifact; where a hub-layout folder's user puts it), `name` itself
    if it is a local folder, the local Hugging Face cache. Nothing is downloaded."""
    candidates = [folder / TEXT_CONFIG_DIR] if folder is not None else []
    candidates.append(Path(name))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    cached = cached_file_folder(name, "config.json")
    if cached is not None:
        return cached
    where = f"{folder / TEXT_CONFIG_DIR}/config.json, or " if folder is not None else ""
    raise HfTextFilesError(
        f"the text tower is the transformers model {name!r}, whose config.json is not on this "
        f"machine (looked in {where}the local Hugging Face cache); nothing is downloaded here: "
        f"copy {name}'s config.json to "
        f"{(folder / TEXT_CONFIG_DIR) if folder is not None else 'FOLDER/' + TEXT_CONFIG_DIR}/"
    )


def cached_file_folder(repo_id: str, file_name: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local Hugging Face cache if it holds `file_name`
    (never downloaded), else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, file_name)
    except ValueError:  # not a repo id (a path, a name with spaces)
        return None
    return Path(found).parent if isinstance(found, str) else None


def write_text_config(clip: Any, folder: Path) -> None:
    """Save the transformers config of `clip`'s Hugging Face text tower (if it has one) into
    FOLDER/hf_text_config: from the model itself, so every artifact writer carries it."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(clip, "text", None)
    if isinstance(text, HFTextEncoder):
        text.config.save_pretrained(folder / TEXT_CONFIG_DIR)


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_TOKENIZER_FILES)


def tokenizer_folder(model_cfg: dict[str, Any], folder: Path | None) -> Path | None:
    """Where the files of the model's Hugging Face tokenizer are: FOLDER if it holds them, else
    `hf_tokenizer_name` as a local folder or in the local cache; None for open_clip's own
    tokenizer."""
    name = str(model_cfg.get("text_cfg", {}).get("hf_tokenizer_name") or "")
    if not name:
        return None
    for candidate in ([folder] if folder is not None else []) + [Path(name)]:
        if has_tokenizer_files(candidate):
            return candidate
    cached = cached_file_folder(name, "tokenizer_config.json")
    if cached is None:
        raise HfTextFilesError(
            f"the tokenizer {name!r} has no files on this machine (looked in "
            f"{f'{folder}, ' if folder is not None else ''}the local Hugging Face cache)"
        )
    return cached


def tokenizer_copier(folder: Path) -> Callable[[Path], None]:
    """A function copying the Hugging Face tokenizer files of `folder` into an artifact."""

    def copy(artifact: Path) -> None:
        copied = [name for name in HF_TOKENIZER_FILES if (folder / name).is_file()]
        if not copied:
            raise HfTextFilesError(
                f"no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}) in {folder}"
            )
        for name in copied:
            shutil.copyfile(folder / name, artifact / name)

    return copy
