"""flash_sdxl.py on a tiny random SDXL-layout model (two text encoders, pooled embeddings, time ids).
The run plumbing is tested in tests/test_runs.py; these tests cover what the SDXL conditioning changes, end
to end through main(argv), and resume from the saved state."""
import os

import numpy as np
import pytest
import torch
from conftest import load_state, metrics

import common
import flash_sdxl


def argv(model, shards, out, *extra):
    return ["--model", model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
            "--batch_size", "2", "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8",
            "--distill_loss", "l2", "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
            "--validation_prompts", "a red square", "a blue circle", *extra]


@pytest.fixture(scope="module")
def loaded(sdxl_model, shards, tmp_path_factory):
    args = flash_sdxl.parse_args(argv(sdxl_model, shards, tmp_path_factory.mktemp("o")))
    return flash_sdxl.build(args, torch.device("cpu"))


def test_defaults_are_the_sdxl_column():
    a = flash_sdxl.parse_args(["--shards", "x.tar"])
    assert (a.model, a.resolution, a.batch_size) == ("stabilityai/stable-diffusion-xl-base-1.0", 1024, 2)
    assert (a.lora_rank, a.lora_alpha, a.num_teacher_steps, a.guidance_min, a.guidance_max) == (64, 64, 32, 3, 13)
    assert a.dmd_weights == [0, .3, .5, .7] and a.adv_weights == [0, .1, .2, .3] and a.phase_steps == [2500] * 4


def test_published_trainable_parameter_count():
    """LoRA (rank 64 on every attention projection of the real SDXL UNet) + head = 108M, the paper's published count."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            use_linear_projection=True)
    assert abs(sum(p.numel() for p in unet.parameters()) / 1e6 - 2567.5) < 0.1
    lora = sum(64 * (mod.in_features + mod.out_features) for name, mod in unet.named_modules()
               if name.endswith(tuple(flash_sdxl.LORA_TARGETS)))
    head = flash_sdxl.make_discriminator(1280, 32)
    assert head(torch.randn(1, 1280, 32, 32)).shape == (1, 1)  # 32x32 mid-block map at 1024 px -> one logit
    assert abs((lora + sum(p.numel() for p in head.parameters())) / 1e6 - 108) < 1


def test_conditioning_and_the_zeroed_unconditional_input(loaded):
    tokenizers, encoders = loaded.tokenizers, loaded.text_encoders
    cond = flash_sdxl.encode_text(tokenizers, encoders, ["a red square", "a blue circle"], 32, torch.device("cpu"))
    assert cond["text"].shape == (2, 77, 64)  # CLIP-L 32 + CLIP-G 32, penultimate layers
    with torch.no_grad():
        ids = tokenizers[1](["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = encoders[1](ids, output_hidden_states=True)
    torch.testing.assert_close(cond["text"][:1, :, 32:], out.hidden_states[-2])
    torch.testing.assert_close(cond["pooled"][:1], out.text_embeds)
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    uncond = flash_sdxl.zero_uncond(cond)
    assert not uncond["text"].any() and not uncond["pooled"].any() and torch.equal(uncond["time_ids"], cond["time_ids"])
    assert cond["text"].abs().sum() > 0 and cond["pooled"].abs().sum() > 0


def test_mid_features_include_the_added_conditioning(loaded):
    tokenizers, encoders, unet = loaded.tokenizers, loaded.text_encoders, loaded.denoiser
    cond = flash_sdxl.encode_text(tokenizers, encoders, ["a", "b"], 32, torch.device("cpu"))
    seen = []
    hook = unet.mid_block.register_forward_hook(lambda mod, i, o: seen.append(o))
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 750])
    with torch.no_grad(), flash_sdxl.teacher_mode(unet):
        flash_sdxl.denoise(unet, x, t, cond)
        feats = flash_sdxl.mid_features(unet, x, t, cond)
        other = flash_sdxl.mid_features(unet, x, t, dict(cond, pooled=cond["pooled"] + 1))
    hook.remove()
    torch.testing.assert_close(feats, seen[0], rtol=0, atol=1e-6)
    assert (other - feats).abs().max() > 1e-4  # the pooled embedding reaches the features


def test_teacher_solve_matches_the_stock_sdxl_pipeline(loaded):
    """Our CFG solve from pure noise, with zeroed unconditional embeddings, is StableDiffusionXLPipeline
    with DPM-Solver++ (trailing) and no negative prompt."""
    from diffusers import StableDiffusionXLPipeline
    m = loaded
    tokenizers, encoders, vae, unet, sched = m.tokenizers, m.text_encoders, m.vae, m.denoiser, m.teacher_sched
    prompts = ["a red square", "a blue circle"]
    cond = flash_sdxl.encode_text(tokenizers, encoders, prompts, 32, torch.device("cpu"))
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16)
    sched.set_timesteps(4)
    ours = flash_sdxl.teacher_solve(m, x_t, 0, cond, flash_sdxl.zero_uncond(cond), 5.0)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True)
    with flash_sdxl.teacher_mode(unet):
        stock = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, latents=x_t, output_type="latent",
                     height=32, width=32).images
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-4)


def test_bad_model_layout_is_named(sd_model, sdxl_model, shards, tmp_path):
    import flash_sd
    with pytest.raises(common.UsageError, match="flash_sd.py"):
        flash_sdxl.main(argv(sd_model, shards, tmp_path / "a"))
    with pytest.raises(common.UsageError, match="flash_sdxl.py"):
        flash_sd.main(argv(sdxl_model, shards, tmp_path / "b"))


@pytest.fixture(scope="module")
def e2e(sdxl_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    m, step = flash_sdxl.main(argv(sdxl_model, shards, out, "--lr", "3e-3", "--lr_disc", "3e-3", "--checkpoint_every",
                                   "2", "--keep_checkpoints", "1", "--sample_every", "4"))
    assert step == 4
    return out, m


def test_end_to_end_run(e2e):
    out, m = e2e
    rows = metrics(out)
    assert [r["phase"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["dmd"] == 0 and rows[0]["adv"] == 0 and rows[0]["distill"] > 0 and rows[0]["disc"] > 0
    assert all(r["dmd"] > 0 and r["adv"] > 0 for r in rows[1:])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000004"]
    from PIL import Image
    assert Image.open(out / "samples" / "step_000004.png").size == (4 * 128, 2 * 128 + 14)


def test_lora_loads_into_a_stock_sdxl_pipeline(e2e, sdxl_model):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    out, m = e2e
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red square", num_inference_steps=4, guidance_scale=0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    before = run()
    pipe.load_lora_weights(str(out))
    assert np.abs(run() - before).max() > 1e-3
    cond = flash_sdxl.encode_text([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                  ["a"], 32, torch.device("cpu"))
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([749])
    with torch.no_grad():  # the loaded LoRA, scale alpha / r = 2 included, is exactly the trained student
        torch.testing.assert_close(flash_sdxl.denoise(pipe.unet, x, t, cond), flash_sdxl.denoise(m.denoiser, x, t, cond),
                                   rtol=1e-5, atol=1e-5)


def test_resume_continues_from_the_saved_state(sdxl_model, shards, tmp_path, monkeypatch):
    from peft.utils import get_peft_model_state_dict
    out = tmp_path / "run"
    args = ["--phase_steps", "1", "2", "0", "0", "--checkpoint_every", "1", "--keep_checkpoints", "0", "--lr", "3e-3"]
    _, step = flash_sdxl.main(argv(sdxl_model, shards, out, *args, "--max_steps", "1"))
    assert step == 1
    saved = load_state(out / "checkpoints" / "step_000001")
    first_seen = {}
    real_step = flash_sdxl.train_step

    def spy(m, *a):  # what the resumed run's first step starts from
        if not first_seen:
            first_seen.update(lora={k: v.clone() for k, v in get_peft_model_state_dict(m.denoiser).items()},
                              disc={k: v.clone() for k, v in m.disc.state_dict().items()})
        return real_step(m, *a)

    monkeypatch.setattr(flash_sdxl, "train_step", spy)
    _, step = flash_sdxl.main(argv(sdxl_model, shards, out, *args, "--resume", "latest"))
    assert step == 3 and [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert saved["step"] == 1 and max(v.abs().max() for k, v in saved["lora"].items() if "lora_B" in k) > 0
    assert all(torch.equal(first_seen["lora"][k], saved["lora"][k]) for k in saved["lora"])
    assert all(torch.equal(first_seen["disc"][k], saved["disc"][k]) for k in saved["disc"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001", "step_000002", "step_000003"]
    # Adam continued from the saved state: its step count goes on from 1
    assert {int(s["step"]) for s in load_state(out / "checkpoints" / "step_000002")["opt_g"]["state"].values()} == {2}
