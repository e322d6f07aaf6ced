"""flash_adapter.py on a tiny SDXL + T2I-Adapter layout: the adapter's residuals reach every denoiser call,
the edge maps come from the image or from the shard, and a run's LoRA loads into the stock adapter pipeline."""
import os

import numpy as np
import pytest
import torch
from conftest import encode, load_state, metrics, random_image, write_shard
from PIL import Image

import common
import flash_adapter


def argv(model, shards, out, *extra):
    return ["--model", model, "--adapter", os.path.join(model, "adapter"), "--shards", *shards, "--output_dir",
            str(out), "--resolution", "32", "--batch_size", "2", "--phase_steps", "1", "1", "1", "1",
            "--num_teacher_steps", "4", "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4",
            "--lora_alpha", "8", "--distill_loss", "l2", "--log_every", "1", "--sample_every", "100",
            "--checkpoint_every", "100", "--validation_prompts", "a red square", "a blue circle", *extra]


def square_image(size=40):
    a = np.full((size, size, 3), 255, np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def loaded(adapter_model, shards, tmp_path_factory):
    args = flash_adapter.parse_args(argv(adapter_model, shards, tmp_path_factory.mktemp("o")))
    return flash_adapter.build(args, torch.device("cpu"))


def test_defaults_are_the_adapter_column():
    a = flash_adapter.parse_args(["--shards", "x.tar"])
    assert (a.adapter, a.adapter_conditioning_scale, a.edge_key) == ("TencentARC/t2i-adapter-canny-sdxl-1.0", 0.8, None)
    assert (a.num_teacher_steps, a.lora_rank, a.lora_alpha, a.resolution, a.batch_size) == (16, 64, 64, 1024, 2)
    assert a.min_aesthetic < 0 and a.adv_weights == [0, .1, .2, .3] and a.dmd_weights == [0, .3, .5, .7]


def test_edge_map_from_the_image_or_from_the_shard():
    img = common.resize_center_crop(square_image(), 32)
    edges = flash_adapter.edge_input({}, img, 32, None, 1)["edges"]
    assert edges.shape == (1, 32, 32) and 0 <= edges.min() and edges.max() <= 1
    border = np.zeros((32, 32), bool)
    border[6:10, 6:26] = border[22:26, 6:26] = border[6:26, 6:10] = border[6:26, 22:26] = True
    assert edges[0][torch.from_numpy(border)].sum() > 0 and edges[0][torch.from_numpy(~border)].sum() == 0
    assert flash_adapter.edge_input({}, img, 32, None, 3)["edges"].shape == (3, 32, 32)
    ready = np.zeros((32, 32), np.uint8)
    ready[:, 16:] = 255
    sample = {"canny.png": encode(Image.fromarray(ready), "PNG")}
    got = flash_adapter.edge_input(sample, img, 32, "canny.png", 1)["edges"][0]
    assert torch.equal(got, torch.from_numpy(ready / 255.0).float())  # used as it is, not recomputed
    with pytest.raises(ValueError, match="no 'canny.png'"):
        flash_adapter.edge_input({}, img, 32, "canny.png", 1)
    with pytest.raises(ValueError, match="unreadable"):
        flash_adapter.edge_input({"canny.png": b"garbage"}, img, 32, "canny.png", 1)


def test_bad_edge_maps_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        s = dict(jpg=encode(random_image(rng)), json={"caption": f"c{i}"})
        if i % 3 == 0:
            s["canny.png"] = encode(Image.fromarray(np.zeros((32, 32), np.uint8)), "PNG")
        elif i % 3 == 1:
            s["canny.png"] = b"not a png"
        samples.append(s)  # i % 3 == 2: the key is missing
    shard = write_shard(tmp_path / "edges.tar", samples)
    extra = lambda s, img: flash_adapter.edge_input(s, img, 16, "canny.png", 1)  # noqa: E731
    loader = common.make_loader([shard], 16, 2, num_workers=0, min_aesthetic=-1, extra=extra, shuffle=1)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    assert all(b["edges"].shape == (2, 1, 16, 16) and b["edges"].max() == 0 for b in batches)
    assert all(t in ("c0", "c3") for b in batches for t in b["text"])
    assert loader.counts["bad_extra"] >= 2 * len(batches) * 2 - 2
    loader.close()
    none = write_shard(tmp_path / "none.tar", [dict(jpg=encode(random_image(rng)), json={"caption": "x"})])
    with pytest.raises(RuntimeError, match="--edge_key"):
        next(iter(common.make_loader([none], 16, 2, num_workers=0, min_aesthetic=-1, extra=extra)))


def test_configs_that_do_not_load_name_the_model_and_the_adapter(adapter_model, shards, tmp_path):
    for model, adapter in [(adapter_model, str(tmp_path / "no-adapter")), (str(tmp_path), None)]:
        a = argv(model, shards, tmp_path / "run")
        a[a.index("--adapter") + 1] = adapter or os.path.join(adapter_model, "adapter")
        with pytest.raises(common.UsageError, match="cannot read an SDXL layout") as e:
            flash_adapter.check_args(flash_adapter.parse_args(a))
        assert f"--model {model} / --adapter " in str(e.value)


def cond_for(loaded, prompts, edges, scale):
    cond = flash_adapter.encode_text(loaded.tokenizers, loaded.text_encoders, prompts, 32, torch.device("cpu"))
    cond["adapter"] = flash_adapter.adapter_residuals(loaded.adapter, edges, scale)
    return cond


def test_residuals_reach_the_teacher_solve_exactly_as_the_stock_adapter_pipeline(loaded):
    """Both CFG halves get the residuals: our solve equals StableDiffusionXLAdapterPipeline's, and the
    adapter scale changes it."""
    from diffusers import StableDiffusionXLAdapterPipeline
    m = loaded
    tokenizers, encoders, vae, unet, adapter, sched = (m.tokenizers, m.text_encoders, m.vae, m.denoiser, m.adapter,
                                                       m.teacher_sched)
    prompts = ["a red square", "a blue circle"]
    torch.manual_seed(0)
    edges, x_t = torch.rand(2, 1, 32, 32), torch.randn(2, 4, 16, 16)

    def solve(scale):
        cond = cond_for(loaded, prompts, edges, scale)
        sched.set_timesteps(4)
        return flash_adapter.teacher_solve(m, x_t, 0, cond, flash_adapter.zero_uncond(cond), 5.0)

    ours = solve(0.8)
    pipe = StableDiffusionXLAdapterPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                            tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                            adapter=adapter, scheduler=sched, force_zeros_for_empty_prompt=True)
    with flash_adapter.teacher_mode(unet):
        stock = pipe(prompts, image=edges, adapter_conditioning_scale=0.8, num_inference_steps=4,
                     guidance_scale=5.0, latents=x_t, output_type="latent", height=32, width=32).images
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-4)
    assert (solve(0.0) - ours).abs().max() > 1e-3


def test_residuals_reach_the_student_and_the_features_including_the_mid_one(loaded):
    unet = loaded.denoiser
    torch.manual_seed(1)
    edges, x, t = torch.rand(2, 1, 32, 32), torch.randn(2, 4, 16, 16), torch.tensor([10, 750])
    cond, off = cond_for(loaded, ["a", "b"], edges, 0.8), cond_for(loaded, ["a", "b"], edges, 0.0)
    assert [r.shape[-1] for r in cond["adapter"]] == [8, 8, 4, 4]  # the last one is the mid residual
    seen = []
    hook = unet.mid_block.register_forward_hook(lambda mod, i, o: seen.append(o))
    with torch.no_grad():
        student = flash_adapter.denoise(unet, x, t, cond)
        assert (student - flash_adapter.denoise(unet, x, t, off)).abs().max() > 1e-3
        assert len(cond["adapter"]) == 4  # the UNet popped from its own copy of the list
        with flash_adapter.teacher_mode(unet):
            feats = flash_adapter.mid_features(unet, x, t, cond)
    hook.remove()
    # the full forward adds the mid residual to the mid block's output in place, so the hooked tensor
    # seen[0] already holds it; seen[-1] is the mid block's output inside mid_features, before it
    torch.testing.assert_close(feats, seen[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats, seen[-1] + cond["adapter"][-1], rtol=0, atol=1e-5)
    both = flash_adapter.cat_cond(cond, cond)
    assert [r.shape[0] for r in both["adapter"]] == [4] * 4 and both["text"].shape[0] == 4


@pytest.fixture(scope="module")
def e2e(adapter_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    m, step = flash_adapter.main(argv(adapter_model, shards, out, "--lr", "3e-3", "--checkpoint_every", "2",
                                      "--sample_every", "4"))
    assert step == 4
    return out, m


def test_end_to_end_run_and_the_lora_in_a_stock_adapter_pipeline(e2e, adapter_model):
    from diffusers import LCMScheduler, StableDiffusionXLAdapterPipeline
    out, m = e2e
    rows = metrics(out)
    assert [r["phase"] for r in rows] == [0, 1, 2, 3] and all(r["dmd"] > 0 and r["adv"] > 0 for r in rows[1:])
    grid = Image.open(out / "samples" / "step_000004.png")
    assert grid.size == (5 * 128, 2 * 128 + 14)  # edges, teacher, student 1/2/4
    assert np.asarray(grid)[14:, :128].max() > 0  # the edge column is not empty
    assert m.val_edges.shape == (2, 1, 32, 32) and m.extra.func is flash_adapter.edge_input
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002", "step_000004"]
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(adapter_model)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    edges = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 7 == 0).astype(np.uint8) * 255)

    def run():
        return pipe("a red square", image=edges, num_inference_steps=4, guidance_scale=0, height=32, width=32,
                    adapter_conditioning_scale=0.8, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    before = run()
    pipe.load_lora_weights(str(out))
    assert np.abs(run() - before).max() > 1e-3


def test_resume_continues_from_the_saved_state(adapter_model, shards, tmp_path, monkeypatch):
    from peft.utils import get_peft_model_state_dict
    out = tmp_path / "run"
    args = ["--phase_steps", "1", "1", "0", "0", "--checkpoint_every", "1", "--keep_checkpoints", "0", "--lr", "3e-3"]
    _, step = flash_adapter.main(argv(adapter_model, shards, out, *args, "--max_steps", "1"))
    assert step == 1
    saved = load_state(out / "checkpoints" / "step_000001")
    first_seen = {}
    real_step = flash_adapter.train_step

    def spy(m, student, disc, batch, *a):  # what the resumed run's first step starts from
        if not first_seen:
            first_seen.update(lora={k: v.clone() for k, v in get_peft_model_state_dict(m.denoiser).items()},
                              disc={k: v.clone() for k, v in m.disc.state_dict().items()}, edges=batch["edges"].shape)
        return real_step(m, student, disc, batch, *a)

    monkeypatch.setattr(flash_adapter, "train_step", spy)
    _, step = flash_adapter.main(argv(adapter_model, shards, out, *args, "--resume", "latest"))
    assert step == 2 and [r["step"] for r in metrics(out)] == [1, 2]
    assert saved["step"] == 1 and max(v.abs().max() for k, v in saved["lora"].items() if "lora_B" in k) > 0
    assert first_seen["edges"] == (2, 1, 32, 32)  # the loader's edge maps reach the step
    assert all(torch.equal(first_seen["lora"][k], saved["lora"][k]) for k in saved["lora"])
    assert all(torch.equal(first_seen["disc"][k], saved["disc"][k]) for k in saved["disc"])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001", "step_000002"]
    # Adam continued from the saved state: its step count goes on from 1
    assert {int(s["step"]) for s in load_state(out / "checkpoints" / "step_000002")["opt_g"]["state"].values()} == {2}
