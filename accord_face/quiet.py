"""Third-party noise off by default (``--verbose`` keeps it), and log lines that do not break tqdm bars.

What is dropped, and why it is noise here:

- OpenCV's ``setPreferableTarget Targets are not supported by the new graph engine``:
  the face models run on the default CPU target anyway.
- transformers' "``CLIPImageProcessor`` requires torchvision ... falling back": the project
  does not use torchvision; the PIL processor is the intended one.
- diffusers' "modules ... should be kept in float32: []": the list is empty (nothing to keep
  in fp32); diffusers' own ``load_ip_adapter`` casts with ``.to(dtype=)``.
- diffusers' "image_encoder is not loaded since image_encoder_folder=None": FaceID adapters
  take identity embeddings, never images.
- diffusers' "No LoRA keys associated to CLIPTextModel": the LoRA trains the UNet only.
- the model-loading / shard-writing progress bars of diffusers, transformers and the hub,
  which also leave cursor-up escape codes in logs.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager

__all__ = ["NOISE", "quiet_third_party", "TqdmHandler", "setup_logging", "phase"]

# (logger that emits it, a substring of the message)
NOISE = [
    ("transformers.utils.import_utils", "requires torchvision"),
    ("diffusers.models.modeling_utils", "should be kept in float32"),
    ("diffusers.loaders.ip_adapter", "image_encoder is not loaded"),
    ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"),
]


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party(verbose: bool = False) -> None:
    """Install the filters and switch the libraries' progress bars off (no-op with ``verbose``).

    Call it first thing in an entry point: OpenCV reads its log level when it is imported.
    """
    if verbose:
        return
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name, text in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))
    if "cv2" in sys.modules:  # imported already: the environment variable came too late
        try:
            from cv2.utils import logging as cv2_logging

            cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_ERROR)
        except (ImportError, AttributeError):
            pass
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


class TqdmHandler(logging.StreamHandler):
    """A stderr handler that writes through ``tqdm.write``, so log lines land above a bar, not on it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def setup_logging(level: int = logging.INFO, fmt: str = "%(levelname)s %(name)s: %(message)s",
                  project_level: int | None = None) -> None:
    """Root logging through ``TqdmHandler`` (replacing basicConfig's stream handler)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler or isinstance(h, TqdmHandler):
            root.removeHandler(h)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    if project_level is not None:
        logging.getLogger("accord_face").setLevel(project_level)


@contextmanager
def phase(message: str, log=None, enabled: bool = True):
    """A line before a long silent step, then an elapsed-time ticker (tqdm, 1 s) until it ends.

        with phase("starting DeepSpeed ..."):
            engine = deepspeed.initialize(...)
    """
    if not enabled:
        yield
        return
    from tqdm import tqdm

    (log or (lambda m: tqdm.write(m, file=sys.stderr)))(message)
    bar = tqdm(total=None, desc=message.split(":")[0].split("(")[0].strip()[:40], bar_format="{desc}: {elapsed}",
               file=sys.stderr, leave=False)
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
