"""LoRA path: training changes the model, export reloads through diffusers, resume, loss terms."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accord_face import losses
from accord_face.config import load_config
from accord_face.lora.config import LoraTrainConfig
from accord_face.lora.export import load_into_pipeline, trainable_state
from accord_face.lora.models import encode_prompts, load_models, restore_frozen_embeddings
from accord_face.lora.objective import Batch, dd_lambda, loss_terms, stratified_timesteps
from accord_face.lora.prompts import PromptSet
from accord_face.lora.sampling import ensure_class_images
from accord_face.lora.train import train_lora

CONFIG = Path(__file__).parents[1] / "configs" / "lora_tiny.yaml"
FAST = ["validation.num_inference_steps=1", "validation.num_validation_images=1",
        "validation.validation_prompts=['sks backpack']",
        "logging.logging_steps=100", "checkpointing.checkpointing_steps=2", "data.synthetic_count=3"]
TRAINED = ["lora.rank=4", "lora.alpha=16", "optimizer.learning_rate=0.01", "textual_inversion.enabled=true",
           "textual_inversion.learning_rate=0.1", "prior.enabled=true", "prior.num_images=2", "prior.inference_steps=1"]


def config(pipeline_dir, out, *overrides) -> LoraTrainConfig:
    return load_config(LoraTrainConfig, CONFIG, [f"pretrained_model={pipeline_dir}", f"output_dir={out}",
                                                 *FAST, *overrides])


@pytest.fixture(scope="module")
def trained(tiny_pipeline_dir, tmp_path_factory):
    """2 steps: UNet LoRA (alpha != rank), DDLoss, PDLoss, a learned token, prior preservation; uninterrupted."""
    out = tmp_path_factory.mktemp("lora_full")
    return train_lora(config(tiny_pipeline_dir, out, "max_steps=2", *TRAINED), log=lambda *a: None)


def unet_out(unet, encode, prompt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=encode(prompt)).sample


def test_training_changes_unet_and_export_reloads_with_load_lora_weights(trained, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    out = Path(trained["output_dir"])
    assert (out / "config.yaml").is_file() and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert Path(trained["grid"]).is_file() and len(list((out / "class_images").glob("class-*.png"))) == 2
    assert {"mse", "prior", "dd", "pd", "dd_ratio", "lambda_dd"} <= set(trained["last"])
    assert load_config(LoraTrainConfig, out / "config.yaml").pretrained_model == tiny_pipeline_dir
    models = trained["models"]
    models.unet.eval()
    ours = {p: unet_out(models.unet, lambda s: encode_prompts(models, [s]), p)
            for p in ("a photo of <sks> backpack on a beach", "a photo of a tree")}

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)

    def pipe_encode(prompt):
        return pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)[0]

    base = unet_out(pipe.unet, pipe_encode, "a photo of a tree")
    assert (base - ours["a photo of a tree"]).abs().max() > 1e-3, "training left the UNet output unchanged"
    load_into_pipeline(pipe, out / "lora")
    for prompt, expected in ours.items():
        torch.testing.assert_close(unet_out(pipe.unet, pipe_encode, prompt), expected, atol=1e-5, rtol=1e-4)


def test_resume_from_newest_checkpoint_matches_uninterrupted_run(trained, tiny_pipeline_dir, tmp_path):
    first = train_lora(config(tiny_pipeline_dir, tmp_path, "max_steps=1", *TRAINED), log=lambda *a: None)
    assert first["start_step"] == 0
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # no state.json: incomplete, ignored
    resumed = train_lora(config(tiny_pipeline_dir, tmp_path, "max_steps=2", *TRAINED), log=lambda *a: None)
    assert resumed["start_step"] == 1
    a, b = trainable_state(resumed["models"]), trainable_state(trained["models"])
    assert a.keys() == b.keys() and "token_embedding" in a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_resume_with_warmup_and_accumulation_matches_uninterrupted_run(tiny_pipeline_dir, tmp_path):
    """The learning rate during warm-up and the Adam moments come back from the accelerate state."""
    extra = ["optimizer.lr_warmup_steps=2", "optimizer.gradient_accumulation_steps=2", "train_batch_size=1",
             "optimizer.learning_rate=0.01", "checkpointing.checkpointing_steps=1", "validation.validation_steps=0"]
    straight = train_lora(config(tiny_pipeline_dir, tmp_path / "straight", "max_steps=3", *extra), log=lambda *a: None)
    train_lora(config(tiny_pipeline_dir, tmp_path / "cut", "max_steps=2", *extra), log=lambda *a: None)
    resumed = train_lora(config(tiny_pipeline_dir, tmp_path / "cut", "max_steps=3", *extra), log=lambda *a: None)
    assert resumed["start_step"] == 2 and straight["last"]["lr"] == resumed["last"]["lr"] == pytest.approx(0.01)
    a, b = trainable_state(resumed["models"]), trainable_state(straight["models"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 0.005, 0.01])   # diffusers' constant_with_warmup


def test_checkpoints_are_accelerate_states_kept_to_the_total_limit(tiny_pipeline_dir, tmp_path):
    from accelerate import Accelerator

    from accord_face.lora.checkpoints import load_checkpoint, register_hooks, save_checkpoint
    from accord_face.lora.models import trainable_parameters

    run = train_lora(config(tiny_pipeline_dir, tmp_path / "run", "max_steps=3", "checkpointing.checkpointing_steps=1",
                            "checkpointing.checkpoints_total_limit=2", "textual_inversion.enabled=false"),
                     log=lambda *a: None)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]   # no temp folder left
    newest = root / "step-00000003"
    assert {"optimizer.bin", "random_states_0.pkl", "trainable.safetensors", "state.json"} <= \
        {p.name for p in newest.iterdir()}
    # load_state restores the weights (load hook), the optimizer and the RNG saved with them
    models = run["models"]
    saved = trainable_state(models)
    accelerator = Accelerator(cpu=True)
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(trainable_parameters(models, 1e-3, 1e-3, 0.0)))
    register_hooks(accelerator, models)
    with torch.no_grad():
        for p in optimizer.param_groups[0]["params"]:
            p.add_(1.0)
    torch.manual_seed(12345)
    assert load_checkpoint(accelerator, newest, models, optimizer)["step"] == 3
    after = trainable_state(models)
    for key in saved:
        torch.testing.assert_close(after[key], saved[key], msg=key)
    rng = torch.load(newest / "random_states_0.pkl", weights_only=False)["torch_manual_seed"]
    assert torch.equal(torch.get_rng_state(), rng)
    stored = torch.load(newest / "optimizer.bin", weights_only=False)
    assert len(optimizer.state_dict()["state"]) == len(stored["state"]) > 0
    first = next(iter(stored["state"]))
    torch.testing.assert_close(optimizer.state_dict()["state"][first]["exp_avg"], stored["state"][first]["exp_avg"])
    # a save prunes to the limit first, and the new folder appears whole
    save_checkpoint(accelerator, root, 4, {"loss": 0.0}, total_limit=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]


def test_two_processes_under_accelerate_launch_equal_one_process_with_twice_the_batch(tiny_pipeline_dir, tmp_path):
    """Per-sample seeding + gradient averaging: 2 ranks x batch 1 take the same step as 1 rank x batch 2."""
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = [f"pretrained_model={tiny_pipeline_dir}", "max_steps=1", *FAST, *TRAINED[:5]]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(Path(__file__).parents[1] / "scripts" / "train_lora.py"), "--config", str(CONFIG),
           f"output_dir={tmp_path / 'two'}", "train_batch_size=1", *overrides]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout + run.stderr
    one = train_lora(config(tiny_pipeline_dir, tmp_path / "one", "train_batch_size=2", "max_steps=1", *TRAINED[:5]),
                     log=lambda *a: None)
    a = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    b = trainable_state(one["models"])
    assert a.keys() == b.keys()
    # Adam's first step is lr * g / (|g| + eps): elementwise ~ lr * sign(g), so float noise in a near-zero
    # gradient element can flip it. Unaveraged or unsummed gradients flip ~10-20 % of all elements.
    flat_a, flat_b = (torch.cat([d[k].flatten() for k in sorted(d)]) for d in (a, b))
    mismatched = ((flat_a - flat_b).abs() > 1e-5).float().mean()
    assert mismatched < 0.01, f"{float(mismatched):.1%} of the weights differ after one step"


# ---------------------------------------------------------------------------
# Loss terms against independent computations
# ---------------------------------------------------------------------------

def lora_models(pipeline_dir, tmp_path, *overrides):
    cfg = config(pipeline_dir, tmp_path, *overrides)
    models = load_models(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero; make the adapter matter
        for name, p in models.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return cfg, models


def make_batch(n=2, n_class=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [PromptSet("a photo of sks backpack with a tree", "a photo of sks backpack", "a photo of a tree")] * n
    batch = Batch(torch.randn(n, 4, 8, 8, generator=gen), prompts, torch.randn(n, 4, 8, 8, generator=gen),
                  torch.tensor([100, 900][:n]))
    if n_class:
        batch.class_latents = torch.randn(n_class, 4, 8, 8, generator=gen)
        batch.class_noise = torch.randn(n_class, 4, 8, 8, generator=gen)
        batch.class_timesteps = torch.tensor([400] * n_class)
        batch.class_prompts = ["a photo of a backpack"] * n_class
    return batch


def plain_forward(models, latents, noise, t, texts, unet=None):
    """DreamBooth's forward written out: add_noise, CLIP hidden states, epsilon prediction."""
    ids = models.tokenizer(texts, padding="max_length", max_length=models.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    x_t = models.scheduler.add_noise(latents, noise, t)
    return (unet or models.unet)(x_t, t, encoder_hidden_states=models.text_encoder(ids)[0]).sample, x_t


def test_lambda_dd_zero_is_exactly_the_dreambooth_lora_loss(tiny_pipeline_dir, tmp_path):
    cfg, models = lora_models(tiny_pipeline_dir, tmp_path, "accord.lambda_dd=0", "textual_inversion.enabled=false")
    batch = make_batch()
    terms, stats = loss_terms(models, batch, cfg, step=0)
    pred, _ = plain_forward(models, batch.latents, batch.noise, batch.timesteps, [p.joint for p in batch.prompts])
    expected = F.mse_loss(pred.float(), batch.noise.float())
    assert set(terms) == {"loss", "mse"} and not stats
    assert torch.equal(terms["loss"], expected)


@pytest.mark.parametrize("reference", ["live", "frozen"])
def test_ddloss_term_uses_the_four_prompts_at_the_same_noisy_latent(tiny_pipeline_dir, tmp_path, reference):
    from diffusers import UNet2DConditionModel

    cfg, models = lora_models(tiny_pipeline_dir, tmp_path, "accord.lambda_dd=0.5", "textual_inversion.enabled=false",
                              f"accord.reference={reference}")
    batch = make_batch()
    terms, stats = loss_terms(models, batch, cfg, step=0)
    ref_unet = models.unet if reference == "live" else UNet2DConditionModel.from_pretrained(tiny_pipeline_dir,
                                                                                            subfolder="unet")
    p = batch.prompts
    joint, x_t = plain_forward(models, batch.latents, batch.noise, batch.timesteps, [q.joint for q in p])
    with torch.no_grad():
        refs = [plain_forward(models, batch.latents, batch.noise, batch.timesteps, texts, ref_unet)[0]
                for texts in ([q.target for q in p], [q.context for q in p], [q.empty for q in p])]
    dd, delta = losses.denoising_decouple_loss(joint, *refs, x_t, batch.timesteps, models.scheduler)
    torch.testing.assert_close(terms["dd"], dd, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(terms["loss"], F.mse_loss(joint, batch.noise) + 0.5 * dd, atol=1e-6, rtol=1e-5)
    assert stats["lambda_dd"] == 0.5 and set(stats) >= {"dd_ratio", "delta_q0", "delta_q3"}
    assert stats["delta_q0"] == pytest.approx(float(delta[0].detach()), rel=1e-4)
    terms["dd"].backward()
    grads = [q.grad for n, q in models.unet.named_parameters() if "lora" in n and q.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "DDLoss must reach the LoRA weights"


def test_stratified_ddloss_covers_every_timestep_quartile(tiny_pipeline_dir, tmp_path):
    cfg, models = lora_models(tiny_pipeline_dir, tmp_path, "accord.lambda_dd=0.5", "textual_inversion.enabled=false",
                              "accord.timesteps=stratified", "accord.t_per_sample=2")
    batch = make_batch(n=2)
    terms, stats = loss_terms(models, batch, cfg, step=0, generator=torch.Generator().manual_seed(0))
    assert {f"delta_q{q}" for q in range(4)} <= set(stats)  # 2 samples x 2 t, one t per quartile
    mse = F.mse_loss(plain_forward(models, batch.latents, batch.noise, batch.timesteps,
                                   [p.joint for p in batch.prompts])[0], batch.noise)
    torch.testing.assert_close(terms["loss"], mse + 0.5 * terms["dd"], atol=1e-6, rtol=1e-5)
    with pytest.raises(Exception, match="t_per_sample"):
        config(tiny_pipeline_dir, tmp_path, "accord.t_per_sample=2")


def test_prior_preservation_class_half_gets_its_own_term(tiny_pipeline_dir, tmp_path):
    cfg, models = lora_models(tiny_pipeline_dir, tmp_path, "accord.lambda_dd=0", "textual_inversion.enabled=false",
                              "prior.enabled=true", "prior.loss_weight=0.25")
    batch = make_batch(n=2, n_class=2)
    terms, _ = loss_terms(models, batch, cfg, step=0)
    with torch.no_grad():
        inst, _ = plain_forward(models, batch.latents, batch.noise, batch.timesteps, [p.joint for p in batch.prompts])
        cls, _ = plain_forward(models, batch.class_latents, batch.class_noise, batch.class_timesteps,
                               batch.class_prompts)
    mse, prior = F.mse_loss(inst, batch.noise), F.mse_loss(cls, batch.class_noise)
    torch.testing.assert_close(terms["mse"], mse, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["prior"], prior, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], mse + 0.25 * prior, atol=1e-6, rtol=1e-5)
    assert abs(float(terms["prior"].detach()) - float(terms["mse"].detach())) > 1e-4


def test_pdloss_trains_only_the_learned_token(tiny_pipeline_dir, tmp_path):
    cfg, models = lora_models(tiny_pipeline_dir, tmp_path, "accord.lambda_dd=0", "accord.lambda_pd=1.0")
    assert models.projection is not None and models.placeholder_ids
    batch = make_batch()
    batch.prompts = [p.replace_word("sks", "<sks>") for p in batch.prompts]
    terms, stats = loss_terms(models, batch, cfg, step=0)
    with torch.no_grad():
        ids = models.tokenizer(["a photo of <sks> backpack", "a photo of a backpack", "a photo of a tree"],
                               padding="max_length", max_length=77, return_tensors="pt").input_ids
        f = models.projection(ids).text_embeds
    expected = (F.cosine_similarity(f[0], f[2], dim=0) - F.cosine_similarity(f[1], f[2], dim=0)).abs()
    torch.testing.assert_close(terms["pd"], expected, atol=1e-6, rtol=1e-5)
    table = models.text_encoder.get_input_embeddings().weight
    table.grad = None
    terms["pd"].backward()
    rows = set(table.grad.abs().sum(dim=1).nonzero().flatten().tolist())
    assert set(models.placeholder_ids) <= rows <= set(ids[0].tolist())  # only f_p's tokens get gradient
    before = table.detach().clone()
    with torch.no_grad():
        table.add_(1.0)  # an optimizer step that moved every row ...
    restore_frozen_embeddings(models)  # ... keeps only the learned one
    moved = (table.detach() - before).abs().sum(dim=1).nonzero().flatten().tolist()
    assert moved == models.placeholder_ids


def test_class_images_are_generated_once_and_cached(tiny_pipeline_dir, tmp_path):
    cfg, models = lora_models(tiny_pipeline_dir, tmp_path, "textual_inversion.enabled=false")
    paths = ensure_class_images(models, tmp_path / "cls", "a photo of a backpack", 2, 1, 0, log=lambda *a: None)
    assert all(p.is_file() for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = ensure_class_images(models, tmp_path / "cls", "a photo of a backpack", 2, 1, 0, log=lambda *a: None)
    assert again == paths and [p.stat().st_mtime_ns for p in paths] == stamps
    with pytest.raises(ValueError, match="class_dir"):
        ensure_class_images(models, tmp_path / "cls", "a photo of a dog", 2, 1, 0, log=lambda *a: None)


def test_text_encoder_lora_says_what_it_needs(tiny_pipeline_dir, tmp_path):
    import importlib.metadata

    from packaging import version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if version.parse(importlib.metadata.version("peft")) >= version.parse(MIN_PEFT_VERSION):
        cfg, models = lora_models(tiny_pipeline_dir, tmp_path, "lora.train_text_encoder=true")
        assert models.trains_text_encoder
    else:
        with pytest.raises(ValueError, match="lora.train_text_encoder"):
            lora_models(tiny_pipeline_dir, tmp_path, "lora.train_text_encoder=true")


def test_ddloss_schedules():
    t = stratified_timesteps(8, 1000, torch.Generator().manual_seed(0))
    assert sorted((t // 125).tolist()) == list(range(8))
    from accord_face.lora.config import AccordConfig

    cfg = AccordConfig(lambda_dd=0.2, warmup_steps=4, every=2)
    assert [dd_lambda(cfg, s) for s in range(6)] == pytest.approx([0.05, 0, 0.15, 0, 0.2, 0])
    assert dd_lambda(dataclasses.replace(cfg, lambda_dd=0.0), 0) == 0
