"""encoder.reference=other_photo: identity inputs from another photo of the same person."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from shards_util import write_shards

from accord_face.family.clip_image import face_crop_from_sample
from accord_face.family.portrait import person_of
from accord_face.family.reference import ReferenceBank
from accord_face.world.coupling import context_fn, home_context, same_field_probability


def _samples(folder):
    out = {}
    for url in sorted(folder.glob("*.tar")):
        with tarfile.open(url) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_swap_takes_another_photo_of_the_same_person(tmp_path):
    shards = write_shards(tmp_path / "s", n_shards=2, per_shard=6, people=3)      # 4 photos per person
    bank = ReferenceBank.from_shards(sorted(map(str, shards.glob("*.tar"))), "sface.npy", images=True,
                                     progress=False)
    assert bank.stats() == {"people": 3, "photos": 12, "single_photo_people": 0}
    raw = _samples(shards)
    import json

    keys = sorted(raw)
    metas = [json.loads(raw[k]["json"]) for k in keys]
    own = torch.stack([torch.from_numpy(np.load(io.BytesIO(raw[k]["sface.npy"]))) for k in keys])
    crops = torch.stack([face_crop_from_sample(raw[k]["jpg"], m, 32) for k, m in zip(keys, metas)])
    ids, new_crops = bank.swap(keys, metas, own, crops, seed=0, step=3)
    by_emb = {tuple(np.round(own[i].numpy(), 5)): i for i in range(len(keys))}
    for i, key in enumerate(keys):
        j = by_emb[tuple(np.round(ids[i].numpy(), 5))]
        assert j != i, "the sample's own photo was kept"
        assert person_of(metas[j], keys[j]) == person_of(metas[i], key)
        assert torch.equal(new_crops[i], crops[j])                  # the crop of the same other photo
    again, _ = bank.swap(keys, metas, own, crops, seed=0, step=3)
    assert torch.equal(again, ids)                                   # seeded by (seed, step, key)
    other_step, _ = bank.swap(keys, metas, own, crops, seed=0, step=4)
    assert not torch.equal(other_step, ids)


def test_a_person_with_one_photo_keeps_its_own(tmp_path):
    shards = write_shards(tmp_path / "s", n_shards=1, per_shard=3, people=0)      # every sample its own person
    bank = ReferenceBank.from_shards([str(next(shards.glob("*.tar")))], "sface.npy", progress=False)
    assert bank.stats()["single_photo_people"] == 3
    own = torch.randn(2, 128)
    ids, crops = bank.swap(["s00_000", "s00_001"], [{}, {}], own, None, 0, 1)
    assert torch.equal(ids, own) and crops is None


def test_home_context_share_matches_rho():
    rng = np.random.default_rng(0)
    pick = context_fn(0.8)
    home = sum(pick(i, j, rng) == home_context(i) for i in range(300) for j in range(4)) / 1200
    # P(home) = rho + (1 - rho) * P(random draw == home) >= 0.8
    assert 0.78 < home < 0.9
    assert home_context(7) == home_context(7) and home_context(7) != home_context(8) or home_context(8) != home_context(9)
    assert same_field_probability(0.0, 6, self_reference=False) == pytest.approx(1 / 6)
    assert same_field_probability(0.8, 6, self_reference=True) == 1.0


def test_other_photo_is_refused_for_portrait():
    from accord_face.train.config import EncoderConfig

    with pytest.raises(ValueError, match="reference=other_photo"):
        EncoderConfig(kind="faceid_portrait", reference="other_photo").validate()
