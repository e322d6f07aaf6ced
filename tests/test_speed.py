"""bench/speed.py: one tiny SD1.5 run on the CPU (our step beside the reference pattern, the breakdown, the
FLOP count, the files it writes), and the parameter counts of the real-size denoisers it builds."""
import importlib.util
import json
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", os.path.join(ROOT, "bench", "speed.py"))
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    return speed


def test_tiny_sd_step_beside_the_reference(tmp_path):
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
        assert x["samples_per_sec"] == pytest.approx(2 / sec)
        assert x["peak_mem_gib"] > 0 and x["flops_per_update"] > 0 and "mfu" not in x  # no MFU on a CPU
        parts = x["breakdown"]
        assert {speed.DATA, speed.TEACHER, speed.STUDENT_FWD, speed.DISTILL_FWD, speed.DMD_FWD, speed.GAN_FWD, speed.BWD_STUDENT,
                speed.BWD_DISTILL, speed.BWD_GAN, speed.DISC, speed.OPT} <= set(parts)
        assert all(v >= 0 for v in parts.values())
        assert sum(parts.values()) == pytest.approx(x["breakdown_total_s"])
        # the instrumented step (its own run, so the machine's load may differ) is close to the timed one
        assert 0.2 * sec < x["breakdown_total_s"] < 5 * sec
    ours, ref = r["ours"], r["reference"]
    assert any(k.startswith(speed.D_PASS) for k in ref["breakdown"]) and not any(
        k.startswith(speed.D_PASS) for k in ours["breakdown"])
    assert r["speedup"] == pytest.approx(ref["sec_per_update"] / ours["sec_per_update"])
    assert r["memory_ratio"] == pytest.approx(ref["peak_mem_gib"] / ours["peak_mem_gib"])
    # the reference does more work per batch: a second teacher solve and forward for the D update
    assert ref["flops_per_update"] > 1.2 * ours["flops_per_update"]
    text = out.read_text()
    assert "| sd | tiny | 32 | 2 |" in text and "reference" in text and "random trunk" in text
    assert f"| {ours['sec_per_update']:.4g} (CPU " in text and f"| {r['speedup']:.2f}x |" in text


def test_table_reprints_a_saved_report(tmp_path, capsys):
    """--table prints the markdown of a saved JSON report: the same text the run wrote beside it."""
    speed = load_speed()
    report = json.load(open(os.path.join(ROOT, "bench", "results", "speed_h200_sdxl_b2_vs_reference.json")))
    speed.main(["--table", os.path.join(ROOT, "bench", "results", "speed_h200_sdxl_b2_vs_reference.json")])
    text = capsys.readouterr().out
    assert text == speed.markdown(report)
    r = report["results"][0]
    assert f"| {r['ours']['sec_per_update']:.4g} |" in text and f"| {r['speedup']:.2f}x |" in text


def test_real_denoiser_sizes():
    """The real architectures at their published sizes, built on the meta device (no memory, no init)."""
    speed = load_speed()
    published = dict(sd=859.5, sdxl=2567.5, pixart=611.3, sd3=2028.3)  # millions
    for name in ("sd", "sdxl", "pixart", "sd3"):
        with torch.device("meta"):
            net = speed.build_denoiser(name, "real")
        assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(published[name], abs=0.1), name


def test_bad_flags_are_refused_before_any_model_is_built(tmp_path, capsys):
    speed = load_speed()
    with pytest.raises(SystemExit):
        speed.parse_args(["--eager_too"])
    assert "add --compile" in capsys.readouterr().err
    out = tmp_path / "bad.md"
    with pytest.raises(SystemExit, match="failed: sd"):
        speed.main(["--backbone", "sd", "--device", "cpu", "--start_index", "40", "--out", str(out)])
    (r,) = json.loads((tmp_path / "bad.json").read_text())["results"]
    assert r["error"] == "ValueError: --start_index 40: must be in 0..31 (K = 32 for sd)" and "ours" not in r
