"""`gmr.json`: the reranker's own metadata, stored beside a HuggingFace checkpoint.

A GMR checkpoint is a HuggingFace Qwen2-VL / Qwen2.5-VL directory plus this file. A checkpoint
without it (a released lychee-rerank-mm download, say) gets the published GMR defaults and a
logged warning. Fields:

- ``format_version``: schema version of this file (1).
- ``system_prompt``: the system message of the chat prompt.
- ``prompt_template``: the chat prompt with ``{system}``, ``{instruction}``, ``{query}`` and
  ``{document}`` slots; ``{query}`` / ``{document}`` expand to the side's image (vision start,
  image pads, vision end) followed by its text, with no separator.
- ``default_instruction``: used when a call gives none; ``task_instructions`` maps task names
  (e.g. MRB task types) to their instruction.
- ``yes_token`` / ``no_token``: the answer words; each must be one token.
- ``min_pixels`` / ``max_pixels``: image resolution bounds (visual tokens = pixels / 28^2).
- ``max_length``: longest prompt in tokens; longer documents have their text truncated.
- ``training``: provenance (objective, data, hyper-parameters) written by ``train/``, or null.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

log = logging.getLogger("gmr_fast")

GMR_SYSTEM_PROMPT = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
GMR_PROMPT_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: {instruction}<Query>:{query}\n<Document>:{document}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
GMR_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
GMR_MIN_PIXELS = 4 * 28 * 28
GMR_MAX_PIXELS = 1280 * 28 * 28
GMR_MAX_LENGTH = 3200
FORMAT_VERSION = 1
_SLOT = re.compile(r"\{(system|instruction|query|document)\}")


@dataclass
class GmrConfig:
    format_version: int = FORMAT_VERSION
    system_prompt: str = GMR_SYSTEM_PROMPT
    prompt_template: str = GMR_PROMPT_TEMPLATE
    default_instruction: str = GMR_DEFAULT_INSTRUCTION
    task_instructions: dict[str, str] = field(default_factory=dict)
    yes_token: str = "yes"
    no_token: str = "no"
    min_pixels: int = GMR_MIN_PIXELS
    max_pixels: int = GMR_MAX_PIXELS
    max_length: int = GMR_MAX_LENGTH
    training: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for slot in ("{system}", "{instruction}", "{query}", "{document}"):
            if self.prompt_template.count(slot) != 1:
                raise ConfigError(f"gmr.json: prompt_template must contain {slot} exactly once")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"gmr.json: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.max_length < 16:
            raise ConfigError(f"gmr.json: max_length {self.max_length} is too small")
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"gmr.json: format_version {self.format_version} is not supported (expected {FORMAT_VERSION})")

    def preprocessor_conflicts(self, checkpoint_dir: os.PathLike) -> list[str]:
        """Messages for each pixel bound of preprocessor_config.json that differs from ours."""
        path = os.path.join(checkpoint_dir, "preprocessor_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                pre = json.load(f)
        except (OSError, json.JSONDecodeError):
            return []
        out = []
        for key in ("min_pixels", "max_pixels"):
            theirs = pre.get(key, (pre.get("size") or {}).get("shortest_edge" if key == "min_pixels" else "longest_edge"))
            ours = getattr(self, key)
            if theirs is not None and int(theirs) != ours:
                out.append(f"{path} says {key} {int(theirs)} but GMR's own usage code passes {ours} "
                           f"({'4' if key == 'min_pixels' else '1280'}*28*28), which is what is used; to use the "
                           f"file's value instead, write a gmr.json beside the weights with \"{key}\": {int(theirs)}")
        return out

    def fill(self, template: str | None = None, **sides: str) -> str:
        """``template`` (default ``prompt_template``) with its slots filled in one pass, as the
        model's chat template builds the prompt: text a slot brings in is never searched for slots
        itself (a query that says "{document}" keeps those words). ``sides`` gives instruction,
        query and document; ``{system}`` is ``system_prompt``."""
        values = {"system": self.system_prompt, **sides}
        return _SLOT.sub(lambda m: values[m.group(1)], self.prompt_template if template is None else template)

    def instruction_for(self, task: str | None = None) -> str:
        return self.task_instructions.get(task, self.default_instruction) if task else self.default_instruction

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "gmr.json") -> "GmrConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def save(self, checkpoint_dir: os.PathLike) -> None:
        with open(os.path.join(checkpoint_dir, "gmr.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)

    @classmethod
    def load(cls, checkpoint_dir: os.PathLike) -> "GmrConfig":
        """gmr.json of a checkpoint, or GMR's published defaults when it has none (a released
        download), with a warning that names any preprocessor_config.json value they override."""
        path = os.path.join(checkpoint_dir, "gmr.json")
        if not os.path.exists(path):
            log.warning("%s has no gmr.json: using the published GMR defaults (prompt, yes/no, %d..%d pixels, "
                        "max_length %d)", checkpoint_dir, GMR_MIN_PIXELS, GMR_MAX_PIXELS, GMR_MAX_LENGTH)
            config = cls()
            for message in config.preprocessor_conflicts(checkpoint_dir):
                log.warning("%s", message)
            return config
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, path)
