"""The diagnosis check lora_oracle (accord_face/world/oracle.py): subject captions and a resumable tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def test_subject_caption_keeps_the_context_swaps_the_subject_and_names_no_person():
    from accord_face.world.clip import world_tokenizer
    from accord_face.world.oracle import SUBJECT, subject_caption
    from accord_face.world.render import IDENTITY_WORDS, caption, random_context

    rng = np.random.default_rng(0)
    tok = world_tokenizer()
    (sks,) = tok("sks", add_special_tokens=False).input_ids           # one token of the world tokenizer ...
    for _ in range(50):
        ctx = random_context(rng)
        plain, subject = caption(ctx), subject_caption(ctx)
        assert sks not in tok(plain).input_ids                          # ... that no world caption uses
        assert subject.count(SUBJECT) == 1 and "a person" not in subject
        assert subject.replace(SUBJECT, "a person") == plain           # every context phrase unchanged
        assert not set(subject.split()) & set(IDENTITY_WORDS)
        assert len(tok(subject).input_ids) <= tok.model_max_length      # not truncated


@pytest.fixture(scope="session")
def world_dir(_embedded_cache):
    from accord_face.tiny import resolve_pretrained

    return Path(resolve_pretrained("embedded:faces"))


def test_tiny_oracle_writes_each_person_and_a_rerun_continues_without_retraining(world_dir, tmp_path, monkeypatch):
    import accord_face.lora.train as lora_train
    from accord_face.world.oracle import OracleRecipe, run_oracle

    recipe = OracleRecipe(photos=2, rank=2, steps=2, batch_size=1, check_identity=1)
    kw = dict(identities=3, steps=2, guidance=4.0, archive=tmp_path / "archive")
    (tmp_path / "archive").mkdir()
    s = run_oracle(tmp_path / "o", 1, recipe, **kw)
    assert s["people"] == 1 and s["names"] == ["h2000"] and s["recipe_check"]["identity"] == 1
    first = (tmp_path / "o" / "h2000" / "result.json").read_text()
    meta = [json.loads(x) for x in (tmp_path / "o" / "h2000" / "photos" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 2 and all(" of sks person" in m["joint"] for m in meta)
    calls = []
    real = lora_train.train_lora
    monkeypatch.setattr(lora_train, "train_lora", lambda cfg, **k: calls.append(cfg.output_dir) or real(cfg, **k))
    s = run_oracle(tmp_path / "o", 2, recipe, **kw)                     # one more person: only that one trains
    assert calls == [str(tmp_path / "o" / "h2001" / "train")]
    assert (tmp_path / "o" / "h2000" / "result.json").read_text() == first
    assert s["people"] == 2 and len(s["per_identity"]["retrieval_top1"]) == 2
    rec = json.loads((tmp_path / "o" / "h2001" / "result.json").read_text())["records"]
    assert [r["generated_with"] for r in rec] == [r["prompt"].replace(" of a person", " of sks person") for r in rec]
    assert json.loads((tmp_path / "archive" / "lora_oracle.json").read_text())["people"] == 2
    with pytest.raises(ValueError, match="recipe"):                   # a cached person of another recipe
        run_oracle(tmp_path / "o", 2, OracleRecipe(photos=2, rank=2, steps=3, batch_size=1, check_identity=1), **kw)
