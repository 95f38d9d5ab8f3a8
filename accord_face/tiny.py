"""The embedded default: Stable-Diffusion-shaped pipelines built offline from a seed.

Nothing here downloads anything. ``build_components(size, seed)`` returns
randomly initialised diffusers/transformers models with the layout of Stable
Diffusion 1.5 (UNet, VAE, CLIP text encoder + tokenizer, DDPM scheduler) plus a
``CLIPTextModelWithProjection`` that shares the text tower, as SD1.5's text
encoder is the text tower of CLIP ViT-L/14. ``save_pipeline`` writes them with
``save_pretrained`` so that ``StableDiffusionPipeline.from_pretrained(folder)``
loads the folder with the hub unreachable; the projection model goes to
``folder/text_encoder_projection`` (ignored by the pipeline loader).

Sizes (``SIZES``): ``tiny`` for tests (64 px, seconds on a CPU), ``small`` for
demos, ``sd15`` with SD1.5's exact architecture and random weights, for
benchmarks (the architecture, not the weights, sets the cost).

``resolve_pretrained("embedded:tiny")`` builds on first use into a cache folder
and returns its path; any other string (hub id or local folder) is returned
unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PROJECTION_SUBFOLDER = "text_encoder_projection"
MARKER = "accord_face_embedded.json"
EMBEDDED_PREFIX = "embedded:"

# Words that get whole-word BPE merges in the embedded tokenizer; anything else
# still tokenizes (byte-level fallback), just into more pieces.
VOCAB_WORDS = (
    "a an the of and with in on at by to for from is photo picture portrait face person man woman boy girl "
    "people close up smiling wearing red blue green yellow black white hat glasses shirt beach city street park "
    "forest mountain snow night day sunset room studio background style painting drawing oil watercolor sks "
    "dog cat backpack car house tree sky water standing sitting holding"
).split()


@dataclass(frozen=True)
class EmbeddedSpec:
    """Architecture knobs of one embedded size."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_head_dim: int
    unet_groups: int
    attention_levels: tuple[bool, ...]  # which UNet levels get cross-attention
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    resolution: int

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


SIZES: dict[str, EmbeddedSpec] = {
    "tiny": EmbeddedSpec((32, 64), 1, 8, 32, (False, True), (8, 16, 16, 16), 1, 8, 32, 2, 4, 64, 64),
    "small": EmbeddedSpec((64, 128, 128), 2, 8, 32, (False, True, True), (32, 64, 64, 64), 1, 32, 128, 4, 4, 256, 128),
    "sd15": EmbeddedSpec((320, 640, 1280, 1280), 2, 8, 32, (True, True, True, False),
                         (128, 256, 512, 512), 2, 32, 768, 12, 12, 3072, 512),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_vocab(words=VOCAB_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP BPE vocabulary written in code.

    Base symbols are the 256 byte characters and their end-of-word forms
    (``x</w>``), as in CLIP; each word then gets left-to-right merges down to a
    single ``word</w>`` token. The specials come last, as in CLIP.
    """
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in words:
        # First let the merges made so far act on the word exactly as BPE will
        # (lowest rank first), then join the remaining pieces left to right.
        # New merges rank after all earlier ones, so earlier words keep their
        # single-token segmentation.
        symbols = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], {m: i for i, m in enumerate(merges)})
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in seen:
                tokens.append(merged)
                seen.add(merged)
            merges.append(pair)
            symbols = [merged] + symbols[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols by rank until no merge applies (the BPE algorithm)."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def make_tokenizer(max_length: int = 77, words=VOCAB_WORDS):
    """A ``CLIPTokenizer`` over ``tokenizer_vocab(words)``, built without any file."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _text_config(spec: EmbeddedSpec, vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads, max_position_embeddings=77,
        projection_dim=spec.text_hidden, hidden_act="quick_gelu", bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def build_components(size: str = "tiny", seed: int = 0) -> dict:
    """Randomly initialised SD-shaped components, deterministic in ``seed``.

    Returns a dict with the ``StableDiffusionPipeline`` components plus
    ``text_encoder_projection`` (a ``CLIPTextModelWithProjection`` whose text
    tower equals ``text_encoder``).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if size not in SIZES:
        raise ValueError(f"unknown embedded size {size!r}; choose one of {sorted(SIZES)}")
    spec = SIZES[size]
    tokenizer = make_tokenizer()
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention_levels))

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=spec.latent_size, in_channels=4, out_channels=4, block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers, down_block_types=down, up_block_types=up,
        cross_attention_dim=spec.text_hidden, attention_head_dim=spec.unet_head_dim,
        norm_num_groups=spec.unet_groups,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        layers_per_block=spec.vae_layers, norm_num_groups=spec.vae_groups, sample_size=spec.resolution,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    config = _text_config(spec, len(tokenizer))
    text_encoder = CLIPTextModel(config)
    torch.manual_seed(seed + 3)
    projection = CLIPTextModelWithProjection(config)
    projection.text_model.load_state_dict(text_encoder.state_dict())
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    for model in (unet, vae, text_encoder, projection):
        model.eval()
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "scheduler": scheduler, "text_encoder_projection": projection,
    }


def save_pipeline(folder: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Build and ``save_pretrained`` an embedded pipeline into ``folder`` (atomically).

    The folder is written under a temporary name and renamed when complete, so
    an interrupted build never leaves a half-written pipeline behind.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    comps = build_components(size, seed)
    projection = comps.pop("text_encoder_projection")
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        projection.save_pretrained(tmp / PROJECTION_SUBFOLDER, safe_serialization=True)
        comps["tokenizer"].save_pretrained(tmp / PROJECTION_SUBFOLDER)
        (tmp / MARKER).write_text(json.dumps({"size": size, "seed": seed, "spec": asdict(SIZES[size])}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cache_dir() -> Path:
    """Where embedded pipelines are cached: ``$ACCORD_FACE_CACHE`` or ``~/.cache/accord-face``."""
    return Path(os.environ.get("ACCORD_FACE_CACHE", Path.home() / ".cache" / "accord-face"))


def ensure_pipeline(size: str = "tiny", seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """Path of the cached embedded pipeline ``size``/``seed``, building it on first use."""
    folder = Path(root or cache_dir()) / f"embedded-{size}-seed{seed}"
    marker = folder / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("size") == size and info.get("seed") == seed and info.get("spec") == json.loads(json.dumps(asdict(SIZES[size]))):
            return folder
    return save_pipeline(folder, size, seed)


def resolve_pretrained(name_or_path: str, root: str | os.PathLike | None = None) -> str:
    """``embedded:<size>[:<seed>]`` or ``embedded:faces`` -> local folder (built on first use); anything else
    unchanged."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    parts = name_or_path[len(EMBEDDED_PREFIX):].split(":")
    size = parts[0] or "tiny"
    if size == "faces":  # the identity world's trained pipeline (accord_face.world), from the committed assets
        from .world.assemble import ensure_world_pipeline

        return str(ensure_world_pipeline(root))
    try:
        seed = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError(f"{name_or_path!r}: the seed after the size must be an integer") from None
    return str(ensure_pipeline(size, seed, root))


def projection_model_path(pretrained: str) -> str | None:
    """The CLIP projection model saved beside an embedded pipeline, if there is one."""
    candidate = Path(pretrained) / PROJECTION_SUBFOLDER
    return str(candidate) if (candidate / "config.json").is_file() else None


def save_sdxl_pipeline(folder: str | os.PathLike, text_hidden: tuple[int, int] = (32, 32), pooled_dim: int = 32,
                       seed: int = 0) -> Path:
    """Save a tiny SDXL-shaped ``StableDiffusionXLPipeline`` (64 px, 8x8 latents) for tests of the SDXL paths.

    Two text encoders of hidden sizes ``text_hidden`` (cross-attention = their sum), the second with a
    projection to ``pooled_dim`` (the pooled text embeds), text-time conditioning as in SDXL.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = make_tokenizer()
    n = len(tok)

    def text_config(hidden: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=n, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=projection, bos_token_id=n - 2,
                              eos_token_id=n - 1, pad_token_id=n - 1, max_position_embeddings=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + pooled_dim,
        cross_attention_dim=sum(text_hidden), norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=64)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(text_config(text_hidden[0], text_hidden[0])),
        text_encoder_2=CLIPTextModelWithProjection(text_config(text_hidden[1], pooled_dim)),
        tokenizer=tok, tokenizer_2=tok,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
