"""The four DDLoss prompts of each reference image, from metadata or fallbacks.

For every reference image the LoRA path needs (README, "ACCORD, as implemented", with the
personalization target ``p`` = the learned subject or style):

    joint    c_pg  "a photo of sks backpack with a tree"   (the training prompt, with gradient)
    target   c_p   "a photo of sks backpack"
    context  c_g   "a photo of a tree"
    empty    c_0   ""

Where they come from, in order of precedence, per image:

1. ``metadata.jsonl`` in the reference folder, one JSON object per line with
   ``file_name`` and either all of ``joint``/``target``/``context`` or a
   ``caption`` (the context description, built into prompts as in 2).
2. ``<image stem>.txt`` beside the image: its text is the caption.
3. ``caption_templates`` from the config: image i gets ``templates[i % n]``.

From a caption: subject mode ``target = instance_prompt``, ``context =
context_template.format(caption=...)``, ``joint = joint_template`` (default
``"{instance} with {caption}"``); style mode ``target = "in sks style"`` (the
instance prompt), ``context`` = the content caption, ``joint = "{caption}
{instance}"``. An image with none of the three is an error naming the file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_NAME = "metadata.jsonl"
DEFAULT_JOINT = {"subject": "{instance} with {caption}", "style": "{caption} {instance}"}


@dataclass(frozen=True)
class PromptSet:
    """The four prompts of one reference image."""

    joint: str
    target: str
    context: str
    empty: str = ""

    def replace_word(self, word: str, token: str) -> "PromptSet":
        """Swap a whole word (e.g. ``sks``) for a learned token in every prompt."""
        def swap(text: str) -> str:
            return " ".join(token if w == word else w for w in text.split(" "))
        return PromptSet(swap(self.joint), swap(self.target), swap(self.context), swap(self.empty))


@dataclass(frozen=True)
class Reference:
    """One reference image, its prompts and where they came from."""

    image: Path
    prompts: PromptSet
    source: str  # "metadata" | "metadata caption" | "caption file" | "template"


def prompts_from_caption(caption: str, cfg: DataConfig) -> PromptSet:
    """Build joint / target / context prompts from one context caption (module docstring, rule 2)."""
    caption = " ".join(caption.split())
    joint_template = cfg.joint_template or DEFAULT_JOINT[cfg.mode]
    fill = {"instance": cfg.instance_prompt, "caption": caption}
    try:
        return PromptSet(joint=joint_template.format(**fill), target=cfg.instance_prompt,
                         context=cfg.context_template.format(**fill))
    except (KeyError, IndexError) as err:
        raise ValueError(f"data.joint_template / data.context_template may only use {{instance}} and "
                         f"{{caption}}; got an unknown field {err}") from None


def read_metadata(folder: Path) -> dict[str, dict]:
    """``metadata.jsonl`` -> {file_name: row}; errors name the line."""
    path = folder / METADATA_NAME
    if not path.is_file():
        return {}
    rows: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"{path}:{lineno} needs a 'file_name' naming an image in {folder}")
        if not (folder / name).is_file():
            raise ValueError(f"{path}:{lineno} names {name!r}, which is not a file in {folder}")
        given = [k for k in ("joint", "target", "context") if k in row]
        if given and len(given) != 3:
            raise ValueError(f"{path}:{lineno} ({name}) gives {given}: give all of joint/target/context, "
                             "or only 'caption'")
        if not given and not isinstance(row.get("caption"), str):
            raise ValueError(f"{path}:{lineno} ({name}) has neither joint/target/context nor 'caption'")
        rows[name] = row
    return rows


def list_images(folder: Path) -> list[Path]:
    # Hidden files are skipped: temporary files of an atomic write (".x.png.tmp.png") are not references.
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def build_references(folder: str | Path, cfg: DataConfig) -> list[Reference]:
    """Every image in ``folder`` with its four prompts (module docstring for the rules)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data.reference_dir {folder} is not a folder")
    images = list_images(folder)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in data.reference_dir {folder}")
    metadata = read_metadata(folder)
    refs = []
    for i, image in enumerate(images):
        row = metadata.get(image.name)
        caption_file = image.with_suffix(".txt")
        if row is not None and "joint" in row:
            prompts = PromptSet(joint=row["joint"], target=row["target"], context=row["context"])
            refs.append(Reference(image, prompts, "metadata"))
        elif row is not None:
            refs.append(Reference(image, prompts_from_caption(row["caption"], cfg), "metadata caption"))
        elif caption_file.is_file() and caption_file.read_text().strip():
            refs.append(Reference(image, prompts_from_caption(caption_file.read_text(), cfg), "caption file"))
        elif cfg.caption_templates:
            caption = cfg.caption_templates[i % len(cfg.caption_templates)]
            refs.append(Reference(image, prompts_from_caption(caption, cfg), "template"))
        else:
            raise ValueError(f"reference image {image} has no caption: add a line for it to {folder / METADATA_NAME}, "
                             f"write {caption_file.name}, or set data.caption_templates")
    return refs


def describe_sources(refs: list[Reference]) -> str:
    """One line for the log: how many images took their prompts from where."""
    counts = Counter(r.source for r in refs)
    parts = ", ".join(f"{n} from {source}" for source, n in sorted(counts.items()))
    return f"{len(refs)} reference images; prompts: {parts}"
