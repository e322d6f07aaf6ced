"""bench/toy.py: the toy world, the judge's numbers, and --quick end to end through flash_sd.py."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import toy  # noqa: E402


def test_drawn_images_show_their_caption():
    rng = np.random.default_rng(0)
    labels = np.array([[0, 0, 2], [1, 3, 1], [2, 2, 0]])  # red circle on blue, yellow square on green, ...
    img = toy.draw(labels, rng).astype(float)
    palette = np.array(list(toy.COLOURS.values()), dtype=float)
    for i, (shape, fg, bg) in enumerate(labels):
        corners = img[i, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert np.abs(corners - palette[bg]).max() < 20, "background colour at the corners"
        assert np.abs(img[i] - palette[fg]).sum(-1).min() < 20, "shape colour somewhere"
    assert len(toy.COMBOS) == 36 and all(f != b for _, f, b in toy.COMBOS)
    assert toy.caption(0, 0, 2) == "a red circle on a blue background"


def test_tokenizer_makes_each_word_one_token():
    tok = toy.toy_tokenizer()
    ids = tok(toy.caption(2, 3, 1)).input_ids
    assert len(ids) == 9 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(set(tok(toy.caption(*c)).input_ids[3] for c in toy.COMBOS)) == 3  # the shape word


def test_frechet_distance_values():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert toy.frechet(f, f) == pytest.approx(0, abs=1e-6)
    shift = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    assert toy.frechet(f, f + shift) == pytest.approx(25, rel=1e-6)  # equal covariances: ||mu1 - mu2||^2
    # N(0, I) against N(0, 4I) in 3-d: tr(I + 4I - 2 * 2I) = 3
    assert toy.frechet(f, 2 * torch.randn(4000, 3, generator=g, dtype=torch.float64)) == pytest.approx(3, rel=0.15)


def test_shipped_judge_reads_data_images():
    judge = toy.load_judge(os.path.join(toy.ASSETS, "judge.pt"))
    rng = np.random.default_rng(7)
    labels = toy.random_labels(300, rng)
    align, feats = toy.judge_read(judge, toy.real_images(labels, rng), labels)
    assert align > 0.95 and feats.shape == (300, 128)
    wrong = np.roll(labels, 1, axis=0)
    assert toy.judge_read(judge, toy.real_images(labels, rng), wrong)[0] < 0.2


def test_quick_run_end_to_end(tmp_path, capfd):
    """The README's first command: data, the shipped teacher's gate, flash_sd.py through its command
    line, and the table from stock pipelines (teacher DPM-Solver++, student LoRA + LCM). toy.py's main and
    the diagnosis run in this process (as `python bench/toy.py --quick` runs them, less an import of torch);
    flash_sd.py runs as its own process."""
    import toy_diagnose
    toy.main(["--quick", "--work_dir", str(tmp_path)])
    stdout = capfd.readouterr().out
    work = tmp_path / "quick"
    res = json.loads((work / "results.json").read_text())
    got = [(r["model"], r["steps"], r["nfe"]) for r in res["rows"]]
    drawn = "teacher, w ~ U[3, 13]"  # the fair reference: w drawn per image as the student learns the teacher
    assert got == [("teacher", n, 2 * n) for n in (32, 8, 4, 2, 1)] + [(drawn, n, 2 * n) for n in (32, 16)] + [
        ("student", n, n) for n in (4, 2, 1)]
    by = {(r["model"], r["steps"]): r for r in res["rows"]}
    assert 0 < by[(drawn, 32)]["mse_to_teacher32"]  # another w than the CFG-5 row's, the same noise and prompts
    assert by[(drawn, 32)]["alignment"] > 0.8
    assert res["rows"][0]["mse_to_teacher32"] == 0 and res["rows"][0]["fd"] >= 0
    assert all(0 <= r["alignment"] <= 1 and np.isfinite(r["fd"]) for r in res["rows"])
    assert any(r["mse_to_teacher32"] > 0 for r in res["rows"][7:])  # the LoRA changed the sampler's output
    assert res["rows"][0]["alignment"] > 0.8  # the shipped teacher follows its prompts at 32 steps
    assert (work / "run" / "pytorch_lora_weights.safetensors").exists()
    assert "| student | 1 | 1 |" in (work / "results.md").read_text()
    from PIL import Image
    assert Image.open(work / "grid.png").size[0] == 5 * 128
    for flag in ("--distill_loss", "--resolution", "--num_teacher_steps"):
        assert flag in res["command"]
    assert "[distill]" in stdout and "[table]" in stdout
    # the diagnosis of the same run: its chains reproduce the stock LCM pipeline (it checks this itself)
    toy_diagnose.main(["--run", str(work / "run"), "--eval_size", "12", "--grad_batches", "1", "--ws", "3", "8", "13"])
    res = json.loads((work / "diagnosis.json").read_text())
    # the ideal steps at three w: the student's mean MSE to them is its MSE to their mean plus their spread
    assert [(r["t"], r["source"]) for r in res["w_spread"]][:3] == [(999, "noise"), (749, "data"), (749, "1-step student")]
    for r in res["w_spread"]:
        to_each = list(r["student_to_ideal"].values())
        assert list(r["student_to_ideal"]) == ["3", "8", "13"]
        assert sum(to_each) / 3 == pytest.approx(r["student_to_mean"] + r["ideal_spread"], rel=1e-4)
        assert r["ideal_first_to_last"] > 0 and r["ideal_spread"] > 0
    # the teacher at fixed w, LoRA off: at w = 5 it is the table's CFG-5 teacher row (same prompts and noise)
    assert [r["w"] for r in res["w_fd"]] == [1, 3, 5, 8, 13]
    w5, table_row = res["w_fd"][2], json.loads((work / "results.json").read_text())["rows"][0]
    assert w5["alignment"] == table_row["alignment"] and w5["fd"] == pytest.approx(table_row["fd"], rel=1e-2)
    assert len({round(r["fd"], 3) for r in res["w_fd"]}) == 5
    # each loss term's gradient at the kept checkpoints (steps 2, 3, 4: phases 2, 3, 3), zero where its weight is
    grads = res["grads"]
    assert sorted({(r["step"], r["phase"]) for r in grads}) == [(2, 2), (3, 3), (4, 3)] and sum(r["n"] for r in grads) == 3
    assert all(r["norm_distill"] > 0 and r["norm_dmd"] > 0 and r["norm_adv"] > 0 for r in grads)
    assert all(-1 <= r["cos_distill_dmd"] <= 1 and r["cos_distill_dmd"] != r["cos_distill_adv"] for r in grads)
    assert "| 2 | 2 | 1 / 0.5 / 0.2 |" in (work / "diagnosis.md").read_text()
    # the student at each kept checkpoint, scored as the table scores it: the last is the table's student
    ckpts, table = res["checkpoints"], json.loads((work / "results.json").read_text())["rows"]
    assert [(r["step"], r["steps"]) for r in ckpts] == [(s, n) for s in (2, 3, 4) for n in (4, 2, 1)]
    for r, row in zip(ckpts[-3:], table[-3:]):
        assert r["alignment"] == row["alignment"] and r["fd"] == pytest.approx(row["fd"], rel=1e-3)
    for r in ckpts:  # an image is aligned only when all three attributes read right
        wrong = [r["wrong_shape"], r["wrong_colour"], r["wrong_background"]]
        assert max(wrong) - 1e-9 <= 1 - r["alignment"] <= sum(wrong) + 1e-9
    assert len({round(r["fd"], 3) for r in ckpts}) > 3
    assert res["chain_vs_pipeline_max_abs"] < 1e-4 and res["eval_size"] == 12
    assert [r["chain"] for r in res["chains"]][:3] == ["S", "S S", "S S S S"]
    assert {(r["t"], r["source"]) for r in res["single_steps"]} == {
        (t, s) for t in (749, 499, 249) for s in ("data", "1-step student")}
    assert all(np.isfinite(r["fd"]) and r["fd"] >= 0 for r in res["chains"])


def test_unknown_stage_is_refused(capsys):
    with pytest.raises(SystemExit):
        toy.parse_args(["--stages", "data,distil"])
    assert "--stages: unknown ['distil']" in capsys.readouterr().err
    assert toy.parse_args(["--stages", "data,distill"]).stages == "data,distill"


def test_teacher_training_writes_a_stock_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline
    argv = ["--quick", "--train_teacher", "--work_dir", str(tmp_path), "--stages", "teacher,judge"]
    args = toy.main(argv)
    assert os.path.exists(os.path.join(args.work_dir, "judge.pt"))
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(args.work_dir, "teacher"))
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the toy's latents
    img = pipe("a red circle on a blue background", num_inference_steps=2, height=16, width=16,
               output_type="np").images
    assert img.shape == (1, 16, 16, 3)
    # --vae keeps a given VAE (here the shipped teacher's, byte for byte) and trains the UNet and text encoder
    argv = ["--quick", "--train_teacher", "--work_dir", str(tmp_path / "kept"), "--stages", "teacher",
            "--vae", os.path.join(toy.ASSETS, "model", "vae")]
    kept = StableDiffusionPipeline.from_pretrained(os.path.join(toy.main(argv).work_dir, "teacher"))
    shipped = StableDiffusionPipeline.from_pretrained(os.path.join(toy.ASSETS, "model"))
    assert kept.vae.config.scaling_factor == shipped.vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(kept.vae.state_dict().values(), shipped.vae.state_dict().values()))


def test_the_teacher_has_cross_attention_at_both_unet_levels():
    """The shipped teacher and teacher_parts: cross-attention at the 8x8 and 4x4 levels and in the mid block, so
    that a LoRA on the attention projections (the scripts' targets) reaches every level, as on SD1.5."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    import flash_sd
    shipped = UNet2DConditionModel.from_pretrained(os.path.join(toy.ASSETS, "model"), subfolder="unet")
    built = toy.teacher_parts(toy.toy_tokenizer())[2]
    for unet in (shipped, built):
        assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 2
        assert list(unet.config.up_block_types) == ["CrossAttnUpBlock2D"] * 2
    shipped.add_adapter(LoraConfig(r=4, target_modules=flash_sd.LORA_TARGETS))
    levels = {n.split(".attentions")[0] for n, m in shipped.named_modules() if hasattr(m, "lora_A")}
    assert levels == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}


def test_the_drawn_w_reference_is_the_pipelines_teacher_at_a_fixed_w():
    """The fair reference rows' sampler (w per image) equals the stock pipeline's DPM-Solver++ teacher when
    the range is one value, so the two kinds of teacher row differ only in w."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(toy.ASSETS, "model"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             timestep_spacing="trailing", final_sigmas_type="zero")
    labels, noise, _, _ = toy.eval_set(4)
    stock = toy.generate(pipe, labels, noise, 8, 5.0)
    torch.testing.assert_close(toy.generate_drawn_w(pipe, labels, noise, 8, (5.0, 5.0)), stock, rtol=1e-4, atol=1e-4)
    assert (toy.generate_drawn_w(pipe, labels, noise, 8, (3.0, 13.0)) - stock).abs().max() > 1e-3
