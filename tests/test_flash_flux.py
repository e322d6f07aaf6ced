"""flash_flux.py on a tiny FLUX.1-dev layout (one double- and one single-stream block with a guidance embedding,
CLIP pooled, T5, a VAE with FLUX's shift and scale, the resolution-dependent scheduler): packing and conditioning
against the stock FluxPipeline, the teacher's Euler solve against it, the grid against the stock 4-step grid, and
the LoRA a run writes in a stock FluxPipeline."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import metrics
from diffusers import FlowMatchLCMScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from models import FLOW_FLUX

import common
import flash_flux

CPU = torch.device("cpu")


def argv(model, shards, out, *extra):
    return ["--model", model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
            "--batch_size", "2", "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4",
            "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8",
            "--distill_loss", "l2", "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
            "--validation_prompts", "a red square", "a blue circle", *extra]


@pytest.fixture(scope="module")
def loaded(flux_model, shards, tmp_path_factory):
    return flash_flux.build(flash_flux.parse_args(argv(flux_model, shards, tmp_path_factory.mktemp("o"))), CPU)


@pytest.fixture(scope="module")
def stock(flux_model):
    pipe = FluxPipeline.from_pretrained(flux_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_defaults_are_the_flux_column():
    a = flash_flux.parse_args(["--shards", "x.tar"])
    assert (a.model, a.resolution, a.batch_size, a.num_teacher_steps) == ("black-forest-labs/FLUX.1-dev", 1024, 2, 32)
    assert (a.guidance_min, a.guidance_max, a.lora_rank, a.lora_alpha) == (2, 5, 64, 64)
    assert a.adv_weights == [0, .1, .3, .5] and a.dmd_weights == [0, .3, .5, .7] and a.phase_steps == [2500] * 4
    assert a.gradient_checkpointing  # on unless --no-gradient_checkpointing
    assert not flash_flux.parse_args(["--shards", "x.tar", "--no-gradient_checkpointing"]).gradient_checkpointing


def test_real_architecture_lora_size():
    """FLUX.1-dev (11,901.4M parameters): LoRA on both streams' attention projections of the 19 double blocks and
    the q, k, v, MLP-in and output projections of the 38 single blocks; nothing else."""
    from peft import LoraConfig
    from models import build_denoiser
    with torch.device("meta"):
        net = build_denoiser("flux", "real").requires_grad_(False)
        assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - 11901.4) < 0.1
        net.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=flash_flux.LORA_TARGETS))
    hit = [n for n, mod in net.named_modules() if hasattr(mod, "lora_A")]
    assert len(hit) == 19 * 8 + 38 * 5
    kinds = {re.sub(r"^(single_)?transformer_blocks\.\d+\.", r"\1B.", n) for n in hit}
    assert kinds == {*(f"B.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                "add_v_proj", "to_add_out")),
                     *(f"single_B.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"))}
    lora = sum(p.numel() for p in net.parameters() if p.requires_grad)
    head = flash_flux.make_discriminator(16, 128)
    assert head(torch.randn(1, 16, 128, 128)).shape == (1, 25)  # 128x128 velocity map at 1024 px -> 5x5 logits
    assert abs(lora / 1e6 - 186.8) < 0.05 and abs(sum(p.numel() for p in head.parameters()) / 1e6 - 2.77) < 0.01


def test_the_mixtures_modes_are_the_stock_few_step_flux_grid():
    """K = 32 with FluxPipeline's sigmas and shift: indices 0, 8, 16, 24 are the stock 4-step grid (1.0, 0.9045,
    0.7595, 0.5128 at 1024 px, mu = 1.15), every other one of them the 2-step grid, at any resolution."""
    train, sigmas = flash_flux.flux_grids(FLOW_FLUX, 32, 128)
    np.testing.assert_allclose(sigmas[[0, 8, 16, 24]], [1.0, 0.9045, 0.7595, 0.5128], atol=1e-4)
    assert len(sigmas) == 33 and sigmas[-1] == 0 and len(train) == 1000
    e = np.exp(1.15)  # the training grid is linspace(1, 0.001, 1000) shifted by the same mu
    u = np.linspace(1, 0.001, 1000)
    np.testing.assert_allclose(train, e / (e + 1 / u - 1), rtol=1e-5)
    for latent in (128, 64, 96):
        _, sigmas = flash_flux.flux_grids(FLOW_FLUX, 32, latent)
        for n in (1, 2, 4):  # as FluxPipeline sets its scheduler for n steps
            lcm = FlowMatchLCMScheduler(**FLOW_FLUX)
            lcm.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift((latent // 2) ** 2))
            torch.testing.assert_close(lcm.sigmas[:n], sigmas[[0, 8, 16, 24][:: 4 // n]])


def test_packing_ids_and_conditioning_match_the_stock_pipeline(loaded, stock):
    z = torch.randn(2, 16, 4, 6)
    packed = flash_flux.pack(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 4, 6))
    assert torch.equal(flash_flux.unpack(packed, 4, 6), z)
    assert torch.equal(flash_flux.image_ids(4, 6, CPU), FluxPipeline._prepare_latent_image_ids(2, 2, 3, CPU, z.dtype))
    prompts = ["a red square", "a blue circle"]
    with torch.no_grad():
        ours = flash_flux.encode_text(loaded.tokenizers, loaded.text_encoders, prompts, CPU)
        text, pooled, _ = stock.encode_prompt(prompts, None, max_sequence_length=512)
    assert ours["text"].shape == (2, 512, 32) and ours["pooled"].shape == (2, 32)
    torch.testing.assert_close(ours["text"], text)
    torch.testing.assert_close(ours["pooled"], pooled)


def test_vae_shift_and_scale_as_the_stock_pipeline_decodes(loaded, stock):
    assert (loaded.vae.config.shift_factor, loaded.vae.config.scaling_factor) == (0.1159, 0.3611)
    run = dict(prompt="a red square", num_inference_steps=2, height=32, width=32)
    with torch.no_grad():
        latents = stock(**run, generator=torch.Generator().manual_seed(0), output_type="latent").images
        image = stock(**run, generator=torch.Generator().manual_seed(0), output_type="pt").images
        ours = (flash_flux.from_latent(loaded.vae, flash_flux.unpack(latents, 16, 16)) / 2 + 0.5).clamp(0, 1)
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.manual_seed(0)
        z = flash_flux.to_latent(loaded.vae, x)
        torch.manual_seed(0)
        raw = loaded.vae.encode(x).latent_dist.sample()
    torch.testing.assert_close(ours, image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, (raw - 0.1159) * 0.3611)


def test_teacher_euler_solve_at_guidance_g_is_the_stock_pipeline(loaded, stock):
    m = loaded
    prompts = ["a red square", "a blue circle"]
    cond = flash_flux.encode_text(m.tokenizers, m.text_encoders, prompts, CPU)
    torch.manual_seed(0)
    x_t = torch.randn(2, 16, 16, 16)  # the tiny VAE downsamples 2x: 32 px -> 16x16
    g = torch.full((2,), 4.25)
    with torch.no_grad():
        ours = flash_flux.teacher_solve(m, x_t, 2, cond, g)
        x = x_t
        with flash_flux.teacher_mode(m.denoiser):
            for i in (2, 3):  # two Euler steps, one forward each: the guidance is an input, not two branches
                v = flash_flux.denoise(m.denoiser, x, m.sigmas[i].expand(2), cond, g)
                x = x + (m.sigmas[i + 1] - m.sigmas[i]) * v
        torch.testing.assert_close(ours, x)
        full = flash_flux.teacher_solve(m, x_t, 0, cond, g)
        ref = stock(prompts, num_inference_steps=4, guidance_scale=4.25, latents=flash_flux.pack(x_t), height=32,
                    width=32, output_type="latent").images
    torch.testing.assert_close(full, flash_flux.unpack(ref, 16, 16), rtol=1e-4, atol=1e-4)
    assert (full - flash_flux.teacher_solve(m, x_t, 0, cond, g - 2)).abs().max() > 1e-4  # g matters


def test_models_it_cannot_distil_are_refused_in_one_line(flux_model, sd3_model, sd_model, shards, tmp_path):
    with pytest.raises(common.UsageError, match="cannot read a diffusers FLUX layout"):
        flash_flux.check_args(flash_flux.parse_args(argv(sd_model, shards, tmp_path / "a")))
    with pytest.raises(common.UsageError) as e:
        flash_flux.check_args(flash_flux.parse_args(argv(sd3_model, shards, tmp_path / "a")))
    assert str(e.value).endswith("its transformer is a SD3Transformer2DModel; use flash_sd3.py for SD3 models")
    import flash_sd3  # and the other way round
    with pytest.raises(common.UsageError) as e:
        flash_sd3.check_args(flash_sd3.parse_args(["--model", flux_model, "--shards", *shards]))
    assert str(e.value) == f"--model {flux_model}: a FLUX transformer; use flash_flux.py"
    schnell = tmp_path / "schnell"
    shutil.copytree(flux_model, schnell)
    config = schnell / "transformer" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), guidance_embeds=False)))
    with pytest.raises(common.UsageError) as e:
        flash_flux.check_args(flash_flux.parse_args(argv(str(schnell), shards, tmp_path / "b")))
    assert str(e.value) == (f"--model {schnell}: no guidance embedding (FLUX.1-schnell?); this script distils "
                            "guidance-distilled FLUX.1-dev models")
    with pytest.raises(common.UsageError, match="multiple of 4 for this model"):  # tiny VAE 2x, then 2x2 packing
        flash_flux.check_args(flash_flux.parse_args(argv(flux_model, shards, tmp_path / "c", "--resolution", "34")))


@pytest.fixture(scope="module")
def e2e(flux_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    m, step = flash_flux.main(argv(flux_model, shards, out, "--lr", "3e-3", "--checkpoint_every", "2",
                                   "--keep_checkpoints", "1", "--sample_every", "4"))
    assert step == 4
    return out, m


def test_end_to_end_run(e2e):
    from PIL import Image
    out, m = e2e
    rows = metrics(out)
    assert [r["phase"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["dmd"] == 0 and rows[0]["adv"] == 0 and rows[0]["disc"] > 0
    # the student starts as the teacher at the same g (LoRA B = 0): from the grid's last level (where this seed's
    # first batch starts) its one step is the teacher's one Euler step, so the distillation loss is exactly 0
    assert round(rows[0]["t"], 1) == round(1000 * float(m.sigmas[-2]), 1) and rows[0]["distill"] == 0
    assert any(r["distill"] > 0 for r in rows) and any(r["dmd"] > 0 for r in rows[1:])
    assert all(r["adv"] > 0 for r in rows[1:])
    assert {round(r["t"], 1) for r in rows} <= {round(1000 * float(s), 1) for s in m.sigmas[:-1]}
    assert all(2 <= r["w"] <= 5 for r in rows)  # the guidance drawn from U[2, 5]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000004"]
    assert Image.open(out / "samples" / "step_000004.png").size == (4 * 128, 2 * 128 + 14)


def test_lora_loads_into_a_stock_flux_pipeline_as_the_trained_student(e2e, flux_model):
    from safetensors import safe_open
    out, m = e2e
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 8)
    pipe = FluxPipeline.from_pretrained(flux_model)
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    cond = flash_flux.encode_text([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                  ["a red square"], CPU)
    x, g = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3.5])

    def one_step():  # the stock sampler's single step from pure noise
        return pipe("a red square", num_inference_steps=1, guidance_scale=3.5, height=32, width=32,
                    latents=flash_flux.pack(x), output_type="latent").images

    with torch.no_grad():
        before = one_step()
        pipe.load_lora_weights(str(out))
        v = flash_flux.denoise(m.denoiser, x, torch.tensor([0.9]), cond, g)
        # the loaded LoRA, scale alpha / r = 2 included, is exactly the trained student
        torch.testing.assert_close(flash_flux.denoise(pipe.transformer, x, torch.tensor([0.9]), cond, g), v,
                                   rtol=1e-5, atol=1e-5)
        after = one_step()
        ref = flash_flux.x0_from_v(x, flash_flux.denoise(m.denoiser, x, torch.ones(1), cond, g), torch.ones(1))
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(flash_flux.unpack(after, 16, 16), ref, rtol=1e-5, atol=1e-5)


def test_resume_continues_the_run(e2e, flux_model, shards, tmp_path):
    src, _ = e2e
    out = tmp_path / "run"
    shutil.copytree(src, out)
    _, step = flash_flux.main(argv(flux_model, shards, out, "--lr", "3e-3", "--phase_steps", "1", "1", "1", "2",
                                   "--keep_checkpoints", "0", "--resume", "latest"))
    assert step == 5 and [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000004", "step_000005"]
