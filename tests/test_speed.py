"""bench/speed.py: one tiny SD1.5 run on the CPU (our step beside the reference pattern, the FLOP count, the
files it writes and --table), the old reports, the refused flags, the default output outside the repository,
and the real-size denoisers' parameter counts (bench/models.py)."""
import glob
import importlib.util
import json
import math
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", os.path.join(ROOT, "bench", "speed.py"))
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    return speed


def test_tiny_sd_step_beside_the_reference(tmp_path, capsys):
    speed = load_speed()
    out = tmp_path / "speed_cpu.md"
    speed.main(["--backbone", "sd", "--size", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
                "--num_teacher_steps", "8", "--batch_size", "2", "--out", str(out)])
    report = json.loads((tmp_path / "speed_cpu.json").read_text())
    assert report["meta"]["versions"]["torch"] == torch.__version__ and report["meta"]["date"]
    assert report["meta"]["settings"]["size"] == "tiny" and report["meta"]["device"] == "cpu"
    (r,) = report["results"]
    assert "error" not in r and r["backbone"] == "sd" and r["batch_size"] == 2 and r["resolution"] == 32
    # the fixed start index is the mean over the phases (K = 8: the modes sit at 0, 2, 4, 6)
    assert r["K"] == 8 and r["start_index"] == 4 and r["solver_steps"] == 8 - r["start_index"]
    for variant in ("ours", "reference"):
        x = r[variant]
        sec = x["sec_per_update"]
        assert math.isfinite(sec) and sec > 0 and x["updated"] == 1 and len(x["step_times"]) == 1
        assert x["samples_per_sec"] == pytest.approx(2 / sec) and 0 < x["cpu_sec_per_update"]
        assert x["peak_mem_gib"] > 0 and x["flops_per_update"] > 0 and "mfu" not in x  # no MFU on a CPU
        assert set(x["losses"]) >= {"distill", "dmd", "adv", "disc", "loss_g"}
        assert all(math.isfinite(v) for v in x["losses"].values())
    ours, ref = r["ours"], r["reference"]
    assert r["speedup"] == pytest.approx(ref["sec_per_update"] / ours["sec_per_update"])
    assert r["memory_ratio"] == pytest.approx(ref["peak_mem_gib"] / ours["peak_mem_gib"])
    # the reference does more work per batch: a second teacher solve and forward for the D update
    assert ref["flops_per_update"] > 1.2 * ours["flops_per_update"]
    text = out.read_text()
    assert "| sd | tiny | 32 | 2 | 4 of 8 | no | ours |" in text and "random trunk" in text
    assert f"| {ours['sec_per_update']:.4g} (CPU " in text and f"| {r['speedup']:.2f}x |" in text
    # --table prints the saved report's markdown again, as the run wrote it
    capsys.readouterr()
    speed.main(["--table", str(tmp_path / "speed_cpu.json")])
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("name", ["sd", "adapter", "pixart"])
def test_the_reference_pattern_computes_our_generator_losses(name):
    """The reference pattern differs from our step in how it computes, not in what: from the same seed it
    draws the same noise, levels and guidance in the same order, so its generator losses are those of the
    script's own train_step (the discriminator's differ: its pass comes after the generator's update)."""
    speed = load_speed()
    opts = speed.parse_args(["--backbone", name, "--device", "cpu", "--num_teacher_steps", "4", "--batch_size", "2"])
    opts.mixed_precision = "no"
    b = speed.build_step(name, opts, torch.device("cpu"))
    torch.manual_seed(1)
    ours = b["mod"].train_step(b["m"], b["student"], b["disc"], b["batch"], b["step"], b["args"])
    for opt in (b["opt_g"], b["opt_d"]):
        opt.zero_grad(set_to_none=True)
    teacher = speed.make_reference_teacher(b)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any("lora" in n for n, _ in teacher.named_parameters())
    torch.manual_seed(1)
    ref, ok = speed.reference_step(b, teacher)
    assert ok
    for key in ("distill", "dmd", "adv", "loss_g"):
        assert ours[key] > 0, key
        torch.testing.assert_close(ref[key], ours[key], rtol=1e-4, atol=1e-5, msg=key)


def test_old_reports_still_print():
    """--table reads the JSON that earlier versions wrote: the saved markdown's title, settings and speed
    table come back line for line."""
    speed = load_speed()
    files = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "speed_*.json")))
    assert len(files) >= 7
    for path in files:
        report = json.load(open(path))
        text = speed.markdown(report)
        saved = open(path[:-5] + ".md").read()
        assert text.startswith("\n\n".join(saved.split("\n\n")[:3]) + "\n"), path  # title, settings, table


def test_real_denoiser_sizes():
    """The real architectures at their published sizes, built on the meta device (no memory, no init)."""
    from models import build_denoiser  # bench/models.py, the configs speed.py builds from
    published = dict(sd=859.5, sdxl=2567.5, pixart=611.3, sd3=2028.3, flux=11901.4)  # millions
    for name in ("sd", "sdxl", "pixart", "sd3", "flux"):
        with torch.device("meta"):
            net = build_denoiser(name, "real")
        assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(published[name], abs=0.1), name


def test_bad_flags_are_refused_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    speed = load_speed()
    for argv, message in ((["--eager_too"], "add --compile"), (["--compile", "--warmup", "0"], "--warmup >= 1"),
                          (["--steps", "0"], "--steps must be >= 1"), (["--warmup", "-1"], "--warmup >= 0")):
        with pytest.raises(SystemExit):
            speed.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    # pytest.fail is no Exception, so main's per-backbone handler cannot swallow it
    monkeypatch.setattr(speed, "build_parts", lambda *a, **k: pytest.fail("a model was built"))
    out = tmp_path / "bad.md"
    with pytest.raises(SystemExit, match="failed: sd"):
        speed.main(["--backbone", "sd", "--device", "cpu", "--start_index", "40", "--out", str(out)])
    (r,) = json.loads((tmp_path / "bad.json").read_text())["results"]
    assert r["error"] == "ValueError: --start_index 40: must be in 0..31 (K = 32 for sd)" and "ours" not in r


def test_the_default_output_is_outside_the_repository(tmp_path, monkeypatch):
    """With no --out the report goes under ~/.cache/flash_speed, and the working tree is left as it was."""
    def status():
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    speed = load_speed()
    monkeypatch.setenv("HOME", str(tmp_path))
    before = status()
    report = speed.main(["--backbone", "sd", "--device", "cpu", "--steps", "1", "--warmup", "0", "--num_teacher_steps",
                         "4", "--batch_size", "1", "--no_reference", "--no_flops"])
    assert status() == before
    saved = json.loads((tmp_path / ".cache" / "flash_speed" / "speed_cpu.json").read_text())
    assert saved == json.loads(json.dumps(report)) and "reference" not in saved["results"][0]
    assert (tmp_path / ".cache" / "flash_speed" / "speed_cpu.md").read_text() == speed.markdown(saved)


def test_flux_memory_estimate_from_the_real_configs(capsys):
    """The README's FLUX estimate: parameter counts of the released architectures on the meta device."""
    est = load_speed().main(["--memory_estimate"])
    counts = {k: round(v, 1) for k, v in est["params_m"].items()}
    assert counts == dict(transformer=11901.4, text_encoder_2=4762.3, text_encoder=123.1, vae=83.8, lora=186.8)
    assert est["transformer"] == pytest.approx(2 * 11.9014, abs=1e-3)  # bf16
    assert est["lora_states"] == pytest.approx(5 * 4 * 0.1867776, abs=1e-4)  # fp32 weight, grad, bucket, 2 moments
    # (4096 image + 512 text tokens) x 3072 x 2 bytes x 57 blocks
    assert est["checkpoints_per_sample_and_pass"] == pytest.approx(4608 * 3072 * 2 * 57 / 1e9)
    assert round(est["fixed"], 1) == 37.5 and round(est["total"], 1) == 43.9
    assert "total 43.9" in capsys.readouterr().out
