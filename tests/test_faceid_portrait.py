"""FaceID-Portrait: n photos -> n x 16 tokens; export -> stock ``load_ip_adapter`` with multi-embedding input."""

import numpy as np
import pytest
import torch

from accord_face import adapter
from accord_face.encoder import build_encoder
from accord_face.train.models import IdentityAdapterModel


def _portrait(base_dir: str, sdxl: bool, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").eval()
    enc = build_encoder("faceid_portrait", id_dim=128, cross_attention_dim=unet.config.cross_attention_dim,
                        num_tokens=16, hidden_dim=256)
    model = IdentityAdapterModel(unet, enc, num_tokens=16).eval()
    with torch.no_grad():
        for proc in adapter.ip_attention_processors(unet).values():
            for p in proc.parameters():
                p.add_(0.1 * torch.randn_like(p))
    out = adapter.export_adapter(tmp_path / "adapter", enc, unet, {"base_model": base_dir, "encoder": "faceid_portrait",
                                                                    "num_tokens": 16})
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(base_dir, **({} if sdxl else {"safety_checker": None}))
    pipe.load_ip_adapter(str(out), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)
    assert type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterFaceIDImageProjection"
    return model, pipe


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_portrait_roundtrip_1_and_3_photos(tiny_pipeline_dir, tmp_path, sdxl):
    from accord_face.tiny import save_sdxl_pipeline

    base = str(save_sdxl_pipeline(tmp_path / "sdxl")) if sdxl else tiny_pipeline_dir
    model, pipe = _portrait(base, sdxl, tmp_path)
    b = 2
    x, t = torch.randn(b, 4, 8, 8), torch.tensor([10, 600])
    text = torch.randn(b, 77, model.unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(b, 32), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * b).float()} \
        if sdxl else {}
    preds = {}
    for n in (1, 3):
        ids = torch.nn.functional.normalize(torch.randn(b, n, 128), dim=-1)          # n photos per sample
        with torch.no_grad():
            ours, tokens = model(x, t, text, ids, added or None)
            theirs = pipe.unet(x, t, encoder_hidden_states=text,
                               added_cond_kwargs={**added, "image_embeds": [ids]}).sample
        assert tokens.shape == (b, 16 * n, model.unet.config.cross_attention_dim)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
        preds[n] = (ids, ours)
    # 3 photos are not 3 copies of the first: the extra tokens change the output
    ids3 = preds[3][0]
    with torch.no_grad():
        first_only, _ = model(x, t, text, ids3[:, :1].expand(-1, 3, -1), added or None)
    assert (first_only - preds[3][1]).abs().max() > 1e-5

    # Stock CFG pipeline call with 3 photos of one person (negative: zero embeddings).
    images = pipe(["a photo of a person"], num_inference_steps=2, output_type="np", guidance_scale=4.0,
                  ip_adapter_image_embeds=adapter.identity_image_embeds(ids3[0]),
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
