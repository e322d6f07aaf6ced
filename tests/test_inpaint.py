"""The worked inpainting model (bench/README.md, "A worked custom model: inpainting", applied by the command in
README.md's "Custom models"): its diff, applied to flash_sd.py, run end to end on a tiny 9-channel inpainting
model saved as a real diffusers folder."""
import importlib.util
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, byte_clip_tokenizer, good_samples, metrics, write_shard

import common

SECTION = "## A worked custom model: inpainting"  # in bench/README.md
COMMAND_SECTION = "## Custom models"  # in README.md


def section_of(path, title):
    text = open(path).read()
    assert title in text, f"{os.path.relpath(path, ROOT)} lost its section {title!r}"
    return text.split(title, 1)[1].split("\n## ", 1)[0]


def awk_command(path, title):
    return next(line for line in section_of(path, title).splitlines() if line.startswith("awk "))


def readme_diff():
    """The diff block of bench/README.md's inpainting section (the one a user applies)."""
    found = re.findall(r"^```diff\n(.*?)^```$", section_of(os.path.join(ROOT, "bench", "README.md"), SECTION),
                       flags=re.S | re.M)
    assert len(found) == 1, "the inpainting section needs exactly one ```diff block"
    return found[0]


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    """flash_inpaint.py made by the README's own command (awk, then git apply) in a copy of the repository's
    files, imported as a module."""
    d = tmp_path_factory.mktemp("copy")
    (d / "bench").mkdir()
    for name in ("flash_sd.py", "common.py", "README.md", "bench/README.md"):
        shutil.copy(os.path.join(ROOT, name), d / name)
    command = awk_command(d / "README.md", COMMAND_SECTION)
    assert command == awk_command(d / "bench" / "README.md", SECTION)  # the two files give the same command
    subprocess.run(["git", "init", "-q"], cwd=d, check=True)
    subprocess.run(command, shell=True, cwd=d, check=True)
    assert open(d / "inpaint.diff").read() == readme_diff()
    assert open(d / "flash_sd.py").read() == open(os.path.join(ROOT, "flash_sd.py")).read()  # left as it is
    spec = importlib.util.spec_from_file_location("flash_inpaint", d / "flash_inpaint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_diff_applies_to_flash_sd_and_stays_small():
    diff = readme_diff()
    assert diff.startswith("diff --git a/flash_sd.py b/flash_inpaint.py\n")
    added = sum(line.startswith("+") and not line.startswith("+++") for line in diff.splitlines())
    removed = sum(line.startswith("-") and not line.startswith("---") for line in diff.splitlines())
    assert 0 < added <= 90 and 0 < removed <= 40, (added, removed)  # the README states the size


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    """A tiny SD1.5 inpainting layout: the tests' tiny UNet with 9 input channels, saved by the stock pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from models import DENOISERS, clip_config, tiny_vae
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tok = byte_clip_tokenizer()
    unet = UNet2DConditionModel(**dict(DENOISERS[("sd", "tiny")][1], in_channels=9))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL(**tiny_vae()), text_encoder=CLIPTextModel(CLIPTextConfig(**clip_config("tiny", vocab=len(tok)))),
        tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    path = str(tmp_path_factory.mktemp("models") / "tiny-inpaint")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def square_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("inpaint_shards")
    return [write_shard(d / "train.tar", good_samples(16, np.random.default_rng(3)))]


def argv(model, shards, out, *extra):
    return ["--model", model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
            "--batch_size", "2", "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8",
            "--lr", "3e-3", "--lr_disc", "3e-3", "--distill_loss", "l2", "--log_every", "1",
            "--validation_prompts", "a red square", "a blue circle", "a green square", *extra]


def test_the_masks_are_boxes_and_strokes_a_quarter_covering_everything(inpaint):
    from PIL import Image
    torch.manual_seed(0)
    masks = torch.stack([inpaint.random_mask({}, Image.new("RGB", (64, 48)))["mask"] for _ in range(400)])
    assert masks.shape == (400, 1, 48, 64) and set(masks.unique().tolist()) == {0.0, 1.0}
    cover = masks.mean((1, 2, 3))
    assert 0.18 < (cover == 1).float().mean() < 0.32  # MASK_ALL = 0.25
    partial = cover[cover < 1]
    assert (partial > 0).all() and 0.05 < partial.median() < 0.6  # something to repaint, and something kept


def test_a_text_to_image_unet_is_refused_at_start_up(inpaint, sd_model, shards, tmp_path):
    with pytest.raises(common.UsageError, match="4 input channels.*takes 9"):
        inpaint.check_args(inpaint.parse_args(argv(sd_model, shards, tmp_path / "run")))


def test_teacher_solve_matches_the_stock_inpainting_pipeline(inpaint, inpaint_model, square_shards, tmp_path):
    """The 9-channel solve with CFG from pure noise, mask and masked image included, is exactly
    StableDiffusionInpaintPipeline with DPM-Solver++ (trailing) at the same steps, mask and guidance."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    args = inpaint.parse_args(argv(inpaint_model, square_shards, tmp_path / "run"))
    m = inpaint.build(args, torch.device("cpu"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    torch.manual_seed(1)
    masks = [Image.fromarray((inpaint.random_mask({}, im)["mask"][0].numpy() * 255).astype(np.uint8)) for im in images]
    pixels = torch.stack([common.image_to_tensor(im) for im in images])
    mask = torch.stack([pil_to_tensor(mk) > 127 for mk in masks]).float()
    assert 0 < mask.mean() < 1
    prompts = ["a red square", "a blue circle"]
    torch.manual_seed(2)  # the masked image's VAE sample: the pipeline draws it from its generator, seeded alike
    with torch.no_grad():
        image_cond = inpaint.image_condition(m, pixels, mask)
    text = inpaint.encode_text(m.tokenizer, m.text_encoder, prompts, m.device)
    cond, uncond = (text, image_cond), (m.uncond.expand(2, -1, -1), image_cond)
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    m.teacher_sched.set_timesteps(4)
    ours = inpaint.teacher_solve(m, x_t, 0, cond, uncond, 5.0)
    pipe = StableDiffusionInpaintPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.denoiser,
                                          scheduler=m.teacher_sched, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with inpaint.teacher_mode(m.denoiser):
        stock = pipe(prompts, image=images, mask_image=masks, latents=x_t, num_inference_steps=4, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(2), height=32, width=32, output_type="latent").images
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-4)
    # the mask and the masked image do reach the teacher: another mask gives another solve
    other = torch.cat([1 - image_cond[:, :1], image_cond[:, 1:]], 1)
    m.teacher_sched.set_timesteps(4)
    moved = inpaint.teacher_solve(m, x_t, 0, (text, other), (uncond[0], other), 5.0)
    assert (moved - ours).abs().max() > 1e-3


def test_every_teacher_call_in_a_training_step_sees_the_mask_and_only_the_text_is_dropped(
        inpaint, inpaint_model, square_shards, tmp_path, monkeypatch):
    import torch.nn.functional as F
    args = inpaint.parse_args(argv(inpaint_model, square_shards, tmp_path / "run"))
    m = inpaint.build(args, torch.device("cpu"))
    seen, real_solve = [], inpaint.teacher_solve
    monkeypatch.setattr(inpaint, "teacher_solve", lambda m, x, k, c, u, w: seen.append((c, u)) or real_solve(m, x, k, c, u, w))
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 4:20, 8:30], mask[1] = 1, 1
    batch = dict(pixel_values=torch.rand(2, 3, 32, 32) * 2 - 1, text=["a red square", "a blue circle"], mask=mask)
    losses = inpaint.train_step(m, m.denoiser, m.disc, batch, 1, args)  # phase 1: distillation, DMD and GAN
    assert all(torch.isfinite(v).all() for v in losses.values()) and losses["dmd"] > 0
    (cond, uncond), = seen
    assert torch.equal(cond[1], uncond[1])  # the unconditional half keeps the mask and the masked image
    assert torch.equal(uncond[0], m.uncond.expand(2, -1, -1))  # and drops the text
    assert torch.equal(cond[1][:, :1], F.interpolate(mask, size=(16, 16)))  # the mask at latent resolution
    assert cond[1].shape == (2, 5, 16, 16)


@pytest.fixture(scope="module")
def inpaint_run(inpaint, inpaint_model, square_shards, tmp_path_factory):
    """A short distillation through main(argv): two updates, a checkpoint, then a resumed run to the end."""
    out = tmp_path_factory.mktemp("inpaint_e2e") / "run"
    common_flags = ["--checkpoint_every", "2", "--sample_every", "4", "--keep_checkpoints", "0"]
    _, step = inpaint.main(argv(inpaint_model, square_shards, out, *common_flags, "--max_steps", "2"))
    assert step == 2 and os.listdir(out / "checkpoints") == ["step_000002"]
    m, step = inpaint.main(argv(inpaint_model, square_shards, out, *common_flags, "--resume", "latest"))
    assert step == 4
    return out, m


def test_distillation_runs_resumes_and_draws_the_inpainting_grid(inpaint_run):
    from PIL import Image
    out, m = inpaint_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["phase"] for r in rows] == [0, 1, 2, 3]
    assert all(r["distill"] > 0 and np.isfinite(r["loss_g"]) for r in rows)
    assert all(r["dmd"] > 0 and r["adv"] > 0 for r in rows[1:])
    assert "resumed from" in open(out / "log.txt").read()
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002", "step_000004"]
    assert set(os.listdir(out / "checkpoints" / "step_000004")) == {
        "training_state.pt", "pytorch_lora_weights.safetensors", "flash_inpaint_comfyui.safetensors"}
    # masked input, teacher, student 1/2/4 steps; one row per validation prompt (3 prompts on a batch of 2)
    grid = np.asarray(Image.open(out / "samples" / "step_000004.png"))
    assert grid.shape == (3 * 128 + 14, 5 * 128, 3)
    masked_input = grid[14:, :128].reshape(3, 128, 128, 3)
    assert np.array_equal(masked_input[0], masked_input[2])  # prompts beyond the batch reuse its images
    assert (np.abs(masked_input.astype(int) - 128) <= 1).all(-1).any()  # the masked region, in grey


def test_the_exported_lora_loads_into_the_stock_inpainting_pipeline_as_the_student(inpaint_run, inpaint_model):
    from diffusers import LCMScheduler, StableDiffusionInpaintPipeline
    out, m = inpaint_run
    pipe = StableDiffusionInpaintPipeline.from_pretrained(inpaint_model, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1

    def run():
        return pipe("a red square", image=image, mask_image=mask, num_inference_steps=4, guidance_scale=0,
                    height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images

    before = run()
    pipe.load_lora_weights(str(out))
    after = run()
    assert np.abs(after - before).max() > 1e-3
    torch.manual_seed(0)
    x, t, c = torch.randn(1, 9, 16, 16), torch.tensor([749]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample,
                                   m.denoiser(x, t, encoder_hidden_states=c).sample, rtol=1e-5, atol=1e-5)
