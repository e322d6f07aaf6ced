"""bench/eval.py on tiny students trained here: the paper's table (teacher, student at 1/2/4 steps), clean-fid's
FID, resume, and two torchrun ranks. clean-fid's Inception and open_clip's ViT-g cannot be downloaded here:
the FID features come from a small fixed random conv net passed as clean-fid's custom_feat_extractor, and CLIP
is a tiny random open_clip model in a local-dir: folder, loaded through the same flags a user gives."""
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT
from PIL import Image

import common
import eval as bench_eval
import flash_flux
import flash_pixart
import flash_sd
import flash_sd3

N = 8  # images per row


def train_argv(model, shards, out, *extra):
    return ["--model", model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32", "--batch_size", "2",
            "--phase_steps", "1", "1", "0", "0", "--num_teacher_steps", "4", "--mixed_precision", "no",
            "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8", "--distill_loss", "l2", "--lr", "3e-3",
            "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
            "--validation_prompts", "a red square", *extra]


class Features(nn.Module):
    """Stand-in for clean-fid's Inception: 3 features of a 299 px image in [0, 255], fixed random weights."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 3, 15, stride=8), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return 100 * self.net(x / 128 - 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """COCO's layout in small: val2017/<id:012d>.jpg of several sizes and captions_val2017.json with two captions
    per image (and one image without any)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2017").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for k, image_id in enumerate(range(11, 11 + N + 1)):
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40 + 4 * k, 48, 3), dtype=np.uint8)).save(root / "val2017" / name)
        images.append(dict(id=image_id, file_name=name, height=40 + 4 * k, width=48))
        if k < N:
            annotations += [dict(id=1000 - k, image_id=image_id, caption=f"a red square number {k} "),
                            dict(id=2000 + k, image_id=image_id, caption=f"a blue circle number {k}")]
    (root / "captions_val2017.json").write_text(json.dumps(dict(images=images[::-1], annotations=annotations)))
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random open_clip model as a local-dir: folder (open_clip_config.json + weights); its tokenizer is
    open_clip's SimpleTokenizer, whose vocabulary ships with the package."""
    from open_clip.model import CLIP
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    d = tmp_path_factory.mktemp("clip")
    (d / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=cfg, preprocess_cfg={})))
    torch.manual_seed(0)
    torch.save(CLIP(**cfg).state_dict(), d / "open_clip_pytorch_model.bin")
    return d


@pytest.fixture(scope="module")
def sd_student(sd_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "flash_sd"
    flash_sd.main(train_argv(sd_model, shards, out))
    return out


def eval_argv(backbone, model, student, coco, clip_dir, out, *extra):
    return ["--backbone", backbone, "--model", model, "--student", str(student),
            "--prompts", str(coco / "captions_val2017.json"), "--reference", str(coco / "val2017"),
            "--num_images", str(N), "--resolution", "32", "--batch_size", "4", "--out", str(out),
            "--clip_model", f"local-dir:{clip_dir}", "--num_workers", "0", *extra]


def check_table(out, steps, nfe, n=N):
    table = json.loads((out / "table.json").read_text())
    rows = [(r["model"], r["steps"], r["nfe"], r["images"]) for r in table["rows"]]
    assert rows == [("teacher", steps, nfe, n), ("student", 1, 1, n), ("student", 2, 2, n), ("student", 4, 4, n)]
    for r in table["rows"]:
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and -1 <= r["clip_score"] <= 1
    md = (out / "table.md").read_text()
    assert "| model | steps | NFE | FID | CLIP score | s / image | images |" in md and "not x100" in md
    assert f"| teacher | {steps} | {nfe} |" in md and "| student | 4 | 4 |" in md
    assert table["environment"]["device"] == "cpu" and table["environment"]["clean-fid"] == "0.1.35"
    return table


@pytest.mark.parametrize("backbone, steps, cfg", [("sd", 50, 7.5), ("sdxl", 50, 5.0), ("adapter", 50, 5.0),
                                                   ("pixart", 20, 4.5), ("sd3", 28, 7.0), ("flux", 28, 3.5)])
def test_rows_default_to_the_stock_pipelines(backbone, steps, cfg):
    args = bench_eval.parse_args(["--backbone", backbone, "--student", "s", "--prompts", "p", "--reference", "r"])
    assert (args.num_images, args.student_steps, args.clip_model, args.clip_pretrained) == (
        5000, [1, 2, 4], "ViT-g-14", "laion2b_s12b_b42k")
    if backbone == "flux":  # guidance is an input of one pass: one NFE a step, and the student keeps it
        assert bench_eval.model_rows(args) == {"teacher": (28, 3.5, 28), "student_1": (1, 3.5, 1),
                                               "student_2": (2, 3.5, 2), "student_4": (4, 3.5, 4)}
        return
    assert bench_eval.model_rows(args) == {"teacher": (steps, cfg, 2 * steps), "student_1": (1, 0, 1),
                                           "student_2": (2, 0, 2), "student_4": (4, 0, 4)}
    args.teacher_guidance = 1.0  # no CFG: one evaluation per step
    assert bench_eval.model_rows(args)["teacher"] == (steps, 1.0, steps)


def test_sd_table_and_resume(sd_student, sd_model, coco, clip_dir, tmp_path):
    out = tmp_path / "eval"
    table = bench_eval.main(eval_argv("sd", sd_model, sd_student, coco, clip_dir, out), feat_extractor=Features())
    check_table(out, 50, 100)  # the stock StableDiffusionPipeline: 50 steps, CFG 7.5
    assert [r["generated"] for r in table] == [N] * 4 and all(r["seconds_per_image"] > 0 for r in table)
    rows = ["teacher", "student_1", "student_2", "student_4"]
    assert all(sorted(os.listdir(out / row)) == [f"{i:05d}.png" for i in range(N)] for row in rows)
    # one caption per image, the lowest annotation id, images in id order; the PNG says which
    meta = Image.open(out / "student_2" / "00003.png").text
    assert (meta["prompt"], meta["seed"]) == ("a red square number 3", "3")
    assert Image.open(out / "grid.png").size == (4 * 128, 4 * 128 + 14)
    # student_1 is what a user gets: the stock pipeline, load_lora_weights, LCM (trailing), 1 step, no CFG
    from diffusers import LCMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(sd_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    def user_image():
        return np.asarray(pipe("a red square number 0", num_inference_steps=1, guidance_scale=0, height=32, width=32,
                               generator=torch.Generator().manual_seed(0)).images[0], dtype=np.int16)

    pix = {row: np.asarray(Image.open(out / row / "00000.png"), dtype=np.int16) for row in rows}
    assert np.abs(user_image() - pix["student_1"]).max() > 1  # without the LoRA: not the student
    pipe.load_lora_weights(str(sd_student))
    assert np.abs(user_image() - pix["student_1"]).max() <= 1
    assert np.abs(pix["student_4"] - pix["student_1"]).max() > 0

    # resume: delete some images; the rerun writes only those, from the same noise, and reuses the reference stats
    gone = [("teacher", 7), ("student_2", 0), ("student_2", 5), ("student_2", 6)]
    for row, i in gone:
        os.remove(out / row / f"{i:05d}.png")
    kept = {p: p.stat().st_mtime_ns for row in rows for p in (out / row).iterdir()}
    ref_mtime = (out / "reference_stats.npz").stat().st_mtime_ns
    table2 = bench_eval.main(eval_argv("sd", sd_model, sd_student, coco, clip_dir, out), feat_extractor=Features())
    assert [r["generated"] for r in table2] == [1, 0, 3, 0]
    assert [r["seconds_per_image"] is None for r in table2] == [False, True, False, True]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert (out / "reference_stats.npz").stat().st_mtime_ns == ref_mtime
    again = np.asarray(Image.open(out / "student_2" / "00000.png"), dtype=np.int16)
    assert np.abs(again - pix["student_2"]).max() <= 1  # seed + index: the same image from another batch
    assert [r["fid"] for r in table2] == pytest.approx([r["fid"] for r in table], rel=1e-2)


def test_fid_is_clean_fid_and_zero_on_the_same_set(coco, tmp_path):
    from cleanfid import fid
    a = sorted(str(p) for p in (coco / "val2017").iterdir())[:N]
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(1)
    for i in range(N):
        Image.fromarray(rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)).save(other / f"{i:05d}.png")
    b = sorted(str(p) for p in other.iterdir())
    ext, cpu = Features(), torch.device("cpu")
    sa, sb = bench_eval.inception_stats(a, ext, cpu, 0), bench_eval.inception_stats(b, ext, cpu, 0)
    assert abs(bench_eval.fid_score(sa, sa)) < 1e-6
    d = bench_eval.fid_score(sa, sb)
    assert d > 0.01
    same = tmp_path / "a"
    same.mkdir()
    for f in a:
        os.symlink(f, same / os.path.basename(f))
    ref = fid.compute_fid(str(same), str(other), mode="clean", custom_feat_extractor=ext, num_workers=0,
                          device=cpu, verbose=False)
    assert d == pytest.approx(ref, rel=1e-6)  # the same number as clean-fid's folder against folder


def test_torchrun_two_ranks_split_the_images(sd_student, sd_model, coco, clip_dir, tmp_path):
    out = tmp_path / "eval"
    argv = eval_argv("sd", sd_model, sd_student, coco, clip_dir, out, "--teacher_steps", "4")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "bench", "eval.py"), *argv, "--generate_only"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert not (out / "table.json").exists()
    for row in ("teacher", "student_1", "student_2", "student_4"):
        files = sorted(os.listdir(out / row))
        assert files == [f"{i:05d}.png" for i in range(N)]  # the union is the requested set
        ranks = [int(Image.open(out / row / f).text["rank"]) for f in files]
        assert ranks == [i % 2 for i in range(N)]  # each index written by one rank: disjoint slices
    # the metrics afterwards, in one process: nothing left to generate
    table = bench_eval.main(argv, feat_extractor=Features())
    assert [r["generated"] for r in table] == [0] * 4
    check_table(out, 4, 8)


def test_pixart_table_from_a_checkpoint(pixart_model, shards, coco, clip_dir, tmp_path):
    run = tmp_path / "flash_pixart"
    flash_pixart.main(train_argv(pixart_model, shards, run, "--checkpoint_every", "2"))
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "adapter_config.json").exists()
    out = tmp_path / "eval"
    argv = eval_argv("pixart", pixart_model, ckpt, coco, clip_dir, out, "--num_images", "4", "--teacher_steps", "4")
    bench_eval.main(argv, feat_extractor=Features())
    check_table(out, 4, 8, n=4)  # CFG 4.5, the stock PixArtAlphaPipeline's


def test_sd3_table_samples_at_the_student_sigmas(sd3_model, shards, coco, clip_dir, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler
    run = tmp_path / "flash_sd3"
    flash_sd3.main(train_argv(sd3_model, shards, run))  # K = 4, no T5
    argv = eval_argv("sd3", sd3_model, run, coco, clip_dir, tmp_path / "eval", "--num_images", "4",
                     "--teacher_steps", "2", "--student_K", "4")
    bench_eval.main(argv, feat_extractor=Features())
    check_table(tmp_path / "eval", 2, 4, n=4)  # CFG 7, the stock StableDiffusion3Pipeline's
    args = bench_eval.parse_args(argv)
    bench_eval.check_args(args)
    pipe = bench_eval.load_pipeline(args, torch.device("cpu"), torch.float32)
    assert pipe.text_encoder_3 is None
    student = bench_eval.load_student(pipe, args, flash_sd3)
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler) and pipe.scheduler.config.shift == 1.0
    grid = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3_model, subfolder="scheduler")
    grid.set_timesteps(4)
    assert [student(n)["sigmas"] for n in (1, 2, 4)] == [flash_sd3.student_sigmas(grid.sigmas, n) for n in (1, 2, 4)]


def test_flux_table_samples_the_stock_grid_at_the_models_guidance(flux_model, shards, coco, clip_dir, tmp_path):
    from diffusers import FlowMatchLCMScheduler
    run = tmp_path / "flash_flux"
    flash_flux.main(train_argv(flux_model, shards, run))
    argv = eval_argv("flux", flux_model, run, coco, clip_dir, tmp_path / "eval", "--num_images", "4",
                     "--teacher_steps", "2")
    table = bench_eval.main(argv, feat_extractor=Features())
    assert [(r["model"], r["steps"], r["nfe"], r["guidance"]) for r in table] == [
        ("teacher", 2, 2, 3.5), ("student", 1, 1, 3.5), ("student", 2, 2, 3.5), ("student", 4, 4, 3.5)]
    args = bench_eval.parse_args(argv)
    bench_eval.check_args(args)
    pipe = bench_eval.load_pipeline(args, torch.device("cpu"), torch.float32)
    assert bench_eval.load_student(pipe, args, flash_flux)(4) == dict(num_inference_steps=4, guidance_scale=3.5)
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler) and pipe.scheduler.config.use_dynamic_shifting


def test_start_up_errors_are_one_line(sd_student, sd_model, coco, clip_dir, tmp_path, capsys, monkeypatch):
    def error(*changes, backbone="sd", student=sd_student):
        argv = eval_argv(backbone, sd_model, student, coco, clip_dir, tmp_path / "eval")
        for flag, value in changes:
            argv[argv.index(flag) + 1] = value
        with pytest.raises(common.UsageError) as e:
            bench_eval.main(argv)
        return str(e.value)

    assert "no such folder" in error(("--reference", str(tmp_path / "none")))
    assert "no pytorch_lora_weights.safetensors" in error(student=tmp_path)
    assert "has 8 prompts, fewer than --num_images 9" in error(("--num_images", "9"))
    (tmp_path / "prompts.txt").write_text("a red square\n\na blue circle\n")
    assert "has 2 prompts" in error(("--prompts", str(tmp_path / "prompts.txt")))
    assert "needs --prompts as a COCO captions json" in error(("--prompts", str(tmp_path / "prompts.txt")),
                                                              ("--num_images", "2"), backbone="adapter")
    with pytest.raises(SystemExit) as e:
        bench_eval.parse_args(["--backbone", "sd2", "--student", "x", "--prompts", "p", "--reference", "r"])
    assert e.value.code == 2 and "invalid choice: 'sd2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_eval.parse_args(["-h"])
    assert "canny" in capsys.readouterr().out.lower()
    # as a command: SystemExit with the one-line message, which Python prints last (exit status 1)
    monkeypatch.setattr(sys, "argv", ["eval.py", *eval_argv("sd", sd_model, tmp_path, coco, clip_dir, tmp_path / "e")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "bench", "eval.py"), run_name="__main__")
    assert str(e.value.code).startswith("eval.py: error: --student ") and "\n" not in str(e.value.code)
