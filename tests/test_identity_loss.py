"""The identity loss (train/identity_loss.py) and the ONNX-as-torch recognizer it runs (onnx_torch.py)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "accord_face" / "world" / "assets"


@pytest.mark.parametrize("name,size", [("recognizer_a", 48), ("recognizer_b", 40), ("detector", 64)])
def test_onnx_module_equals_onnxruntime_and_passes_gradients(name, size):
    import onnxruntime as ort

    from accord_face.onnx_torch import OnnxModule

    path = ASSETS / f"{name}.onnx"
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    net = OnnxModule(path)
    x.requires_grad_(True)
    y = net(x)
    np.testing.assert_allclose(y.detach().numpy(), ref, atol=1e-5)
    y[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0 and not any(b.requires_grad for b in net.buffers())


def test_onnx_module_refuses_an_operator_it_does_not_know(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from accord_face.onnx_torch import OnnxModule

    graph = helper.make_graph([helper.make_node("Softmax", ["input"], ["y"], name="sm")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(NotImplementedError, match="Softmax .*'sm'"):
        OnnxModule(tmp_path / "m.onnx")


def test_differentiable_crop_matches_the_backends_cv2_alignment():
    """crop_theta + grid_sample samples the same pixels as align_world's cv2.warpAffine."""
    from accord_face.train.identity_loss import crop_theta
    from accord_face.world.face_models import align_world, world_template
    from accord_face.world.render import random_context, render

    rng = np.random.default_rng(3)
    photos = [render(i, random_context(rng), 7 + i) for i in (5, 77, 2100)]
    images = torch.from_numpy(np.stack([p.image for p in photos]).astype(np.float32)).permute(0, 3, 1, 2)
    lms = np.stack([p.landmarks for p in photos])
    theta = crop_theta(lms, world_template(48), 64, 48)
    grid = torch.nn.functional.affine_grid(theta, (3, 3, 48, 48), align_corners=False)
    ours = torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)
    ours = ours.permute(0, 2, 3, 1).numpy()
    cv = np.stack([align_world(p.image, p.landmarks, 48) for p in photos]).astype(np.float32)
    assert np.abs(ours - cv).mean() < 1.0, np.abs(ours - cv).mean()        # of 255; rounding only
    # a wrong transform (landmarks shifted by 4 px) is far off: the check can fail
    off = torch.nn.functional.grid_sample(images, torch.nn.functional.affine_grid(
        crop_theta(lms + 4, world_template(48), 64, 48), (3, 3, 48, 48), align_corners=False),
        padding_mode="border", align_corners=False).permute(0, 2, 3, 1).numpy()
    assert np.abs(off - cv).mean() > 5 * np.abs(ours - cv).mean()


@pytest.fixture(scope="module")
def world_shards(_embedded_cache, tmp_path_factory):
    from accord_face.tiny import resolve_pretrained
    from accord_face.world.photos import write_training_photos
    from test_world_models import _prepare

    resolve_pretrained("embedded:faces")
    root = tmp_path_factory.mktemp("idloss")
    write_training_photos(root / "photos", range(4), 2, progress=False)
    _prepare(root / "photos", root / "shards")
    return root / "shards"


def _frozen(cfg):
    from accord_face.train.models import build_model, load_frozen_parts

    parts = load_frozen_parts(cfg, torch.device("cpu"), torch.float32, with_clip=False)
    return parts, build_model(cfg, parts)


def test_identity_loss_on_the_clean_photo_is_near_zero_and_trains_the_adapter(world_shards):
    """Through the real shard path: the stored landmarks, the crop and the torch-run recognizer give back
    the photo's stored (onnxruntime) embedding; on the UNet's x0 estimate the loss is large and its
    gradient reaches the adapter's weights."""
    from accord_face.config import load_config
    from accord_face.data import build_dataset, collate
    from accord_face.data import pixels_to_unit_range
    from accord_face.train.config import TrainConfig
    from accord_face.train.identity_loss import load_identity_loss, training_landmarks
    from accord_face.train.step import compute_losses, prepare_batch

    cfg = load_config(TrainConfig, str(ROOT / "configs" / "faces.yaml"),
                      [f"shards={world_shards}", "losses.lambda_id=1.0", "losses.lambda_dd=0", "losses.lambda_pd=0",
                       "losses.id_timestep_fraction=1.0"])
    cfg = dataclasses.replace(cfg, dropout=dataclasses.replace(cfg.dropout, identity=0.0, caption=0.0, both=0.0))
    manifest = json.loads((world_shards / "manifest.json").read_text())
    samples = list(build_dataset(str(world_shards), resolution=64, shuffle_buffer=0, split_by_node=False,
                                 split_by_worker=False))
    batch = collate(samples)
    loss_fn = load_identity_loss("auto", manifest["recognizer"], torch.device("cpu"))
    assert loss_fn.name == "world_a" and loss_fn.crop_size == 48
    lms = training_landmarks(batch["meta"], 64)
    clean = loss_fn(pixels_to_unit_range(batch["pixel_values"]), lms, batch["face_embedding"])
    assert float(clean.max()) < 0.05, clean                     # same person, same photo: cos > 0.95
    swapped = loss_fn(pixels_to_unit_range(batch["pixel_values"]), lms, batch["face_embedding"].roll(2, 0))
    assert float(swapped.min()) > 0.3, swapped                  # another person's embedding: far

    parts, model = _frozen(cfg)
    parts.identity_loss = loss_fn
    sb = prepare_batch(batch, parts, cfg, 1, torch.device("cpu"), torch.float32)
    terms = compute_losses(model, sb, parts, cfg, 1)
    assert float(terms["id"].detach()) > 0.1 and terms["id"].requires_grad
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad(terms["id"], params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["id"])   # lambda_id 1, nothing else on

    # timesteps above the fraction take no part: a fraction below every t leaves the term at 0
    low = dataclasses.replace(cfg, losses=dataclasses.replace(cfg.losses, id_timestep_fraction=1e-3))
    sb.timesteps = sb.timesteps.clamp(min=2)
    assert float(compute_losses(model, sb, parts, low, 1)["id"]) == 0.0


def test_identity_loss_settings_refuse_what_cannot_work(tmp_path):
    from accord_face.config import load_config
    from accord_face.train.config import TrainConfig
    from accord_face.train.identity_loss import load_identity_loss

    with pytest.raises(ValueError, match="random_flip=false"):
        load_config(TrainConfig, str(ROOT / "configs" / "faces.yaml"),
                    ["losses.lambda_id=0.1", "data.random_flip=true"]).validate()
    with pytest.raises(ValueError, match="id_timestep_fraction"):
        load_config(TrainConfig, str(ROOT / "configs" / "faces.yaml"), ["losses.id_timestep_fraction=0"]).validate()
    with pytest.raises(ValueError, match="insightface.*set losses.id_recognizer"):
        load_identity_loss("auto", {"name": "antelopev2", "backend": "insightface"}, torch.device("cpu"))
    with pytest.raises(ValueError, match="nope.onnx does not exist"):
        load_identity_loss(str(tmp_path / "nope.onnx"), {"backend": "world"}, torch.device("cpu"))


def test_calibration_reports_the_identity_gradient(world_shards, tmp_path):
    """``python -m accord_face.train.calibrate --identity``: the dose of lambda_id is read off ||g_id|| / ||g_base||."""
    from accord_face.train.calibrate import main

    out = tmp_path / "cal.json"
    assert main(["--config", str(ROOT / "configs" / "faces.yaml"), "--shards", str(world_shards), "--batches", "1",
                 "--batch-size", "4", "--identity", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["mean"]
    assert m["grad_id"] > 0 and m["loss_id"] > 0 and -1 <= m["cos_id_base"] <= 1
    assert res["lambda_for_ratio_1"]["id"] == pytest.approx(m["grad_base"] / m["grad_id"])
