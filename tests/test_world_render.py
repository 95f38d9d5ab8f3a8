"""The identity world's renderer and grammar: deterministic, captions name the context only."""

import numpy as np
import pytest

from accord_face.world import render as R
from accord_face.world.clip import match_matrix, world_tokenizer
from accord_face.world.pool import decode_context, encode_context


def test_render_is_deterministic_and_photos_differ():
    ctx = R.Context("blue", "red", "hat", "photo")
    a, b = R.render(7, ctx, 3), R.render(7, ctx, 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.landmarks, b.landmarks)
    assert a.image.shape == (R.SIZE, R.SIZE, 3) and a.image.dtype == np.uint8
    other = R.render(7, ctx, 4)  # another photo of the same person: nuisance differs
    assert not np.array_equal(a.image, other.image)
    assert R.make_identity(7) == R.make_identity(7) and R.make_identity(7) != R.make_identity(8)


def test_enough_distinct_identities_split_by_id():
    keys = {(i.skin_index, i.hair_colour, i.hair_style, i.facial_hair, i.eye_colour, round(i.aspect, 2))
            for i in map(R.make_identity, range(R.N_IDENTITIES))}
    assert R.N_IDENTITIES >= 2000 and len(keys) > 0.95 * R.N_IDENTITIES
    assert R.make_identity(R.HELD_OUT_START - 1).split == "train"
    assert R.make_identity(R.HELD_OUT_START).split == "held_out"
    with pytest.raises(ValueError, match="outside"):
        R.make_identity(R.N_IDENTITIES)


def test_captions_never_describe_the_person():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ctx = R.random_context(rng)
        caps = {R.caption(ctx)} | {R.training_caption(ctx, rng, 0.5) for _ in range(5)}
        for cap in caps:
            words = cap.split()
            assert set(words) <= set(R.GRAMMAR_WORDS), cap
            assert not set(words) & set(R.IDENTITY_WORDS), cap
        # the same context photographed on two different people gets the same caption
        assert R.render(int(rng.integers(2000)), ctx, 0).caption == R.render(int(rng.integers(2000)), ctx, 1).caption
    assert R.caption(R.Context("blue", "red", "hat", "close up")) == \
        "a close up photo of a person wearing a red shirt and a hat on a blue background"


def test_bad_context_names_the_field():
    with pytest.raises(ValueError, match="background 'teal'"):
        R.Context("teal", "red")


def test_tokenizer_has_one_token_per_grammar_word():
    tok = world_tokenizer()
    for w in R.GRAMMAR_WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    longest = R.caption(R.Context("purple", "yellow", "glasses", "close up"))
    assert len(tok(longest).input_ids) <= tok.model_max_length


def test_landmarks_sit_on_the_drawn_features():
    """Without nuisance, the eye landmarks fall on the iris (iris colour darkened by the pupil) and the
    nose tip on the shaded nose."""
    rng = np.random.default_rng(1)
    for i in range(20):
        ident = R.make_identity(i * 37)
        ctx = R.Context("gray", "white", "none", str(rng.choice(R.FRAMINGS)))
        pose = R.photo_pose(ctx, rng, size=256)       # 4x the usual size: the iris is ~4 px across
        img = R.draw(ident, ctx, pose, size=256)
        lm = R.uv_to_pixels(R.landmark_uv(ident), pose)
        iris = np.array(R.EYE_COLOURS[ident.eye_colour], np.float32)
        for x, y in lm[:2]:
            assert (img[int(y), int(x)] <= iris + 15).all(), (i, x, y, img[int(y), int(x)], iris)
        x, y = lm[2]
        assert np.abs(img[int(y), int(x)] - np.array(ident.skin) * 0.78).max() < 40


def test_context_codes_round_trip():
    rng = np.random.default_rng(2)
    for _ in range(50):
        ctx = R.random_context(rng)
        assert decode_context(encode_context(ctx)) == ctx


def test_match_matrix_agrees_with_the_captions():
    """M[i, j] = 1 iff caption i, written for image j's context, reads the same (the accessory taken from
    caption i when caption i names none: then it says nothing about one)."""
    rng = np.random.default_rng(3)
    ctxs = [R.random_context(rng) for _ in range(40)]
    flags = rng.random((40, 3)) < 0.6
    codes = np.stack([encode_context(c) for c in ctxs])
    m = match_matrix(codes, flags)
    for i, ci in enumerate(ctxs):
        kw = dict(include_shirt=bool(flags[i, 0]), include_background=bool(flags[i, 1]),
                  include_accessory=bool(flags[i, 2]))
        cap_i = R.caption(ci, **kw)
        names_acc = flags[i, 2] and ci.accessory != "none"
        for j, cj in enumerate(ctxs):
            cj_ = cj if names_acc else R.Context(cj.background, cj.shirt, ci.accessory, cj.framing)
            assert m[i, j] == float(R.caption(cj_, **kw) == cap_i), (cap_i, R.caption(cj_, **kw))
