"""Run plumbing, on each of the five scripts: every script writes out its own process group, DDP wrap,
checkpoints, resume and signal handling, so each one is tested here, on its tiny model, through main(argv)
or as real torchrun processes."""
import importlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, good_samples, load_state, metrics, write_shard

import common

# script: (its tiny model's fixture, extra flags, the attribute holding the denoiser with its LoRA)
SCRIPTS = {
    "flash_sd": ("sd_model", [], "unet"),
    "flash_sdxl": ("sdxl_model", [], "unet"),
    "flash_adapter": ("adapter_model", ["--adapter", "{model}/adapter"], "unet"),
    "flash_pixart": ("pixart_model", [], "transformer"),
    "flash_sd3": ("sd3_model", [], "transformer"),
}


@pytest.fixture(params=sorted(SCRIPTS))
def script(request):
    """(module, argv builder) for one script on its tiny model."""
    fixture, extra, _ = SCRIPTS[request.param]
    model = request.getfixturevalue(fixture)
    mod = importlib.import_module(request.param)

    def argv(shards, out, *more):
        return ["--model", model, *(e.format(model=model) for e in extra), "--shards", *shards,
                "--output_dir", str(out), "--resolution", "32", "--batch_size", "2",
                "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4", "--mixed_precision", "no",
                "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8", "--distill_loss", "l2",
                "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
                "--validation_prompts", "a red square", *more]
    return mod, argv


def test_checkpoint_folders_are_ordered_by_step_and_skip_interrupted_writes(script, tmp_path):
    mod, _ = script
    root = tmp_path / "checkpoints"
    for name in ("step_999999", "step_1000000", "step_000002", "step_1000001.tmp", "step_000003"):
        (root / name).mkdir(parents=True)
        if name != "step_000003":  # no training_state.pt: not a complete checkpoint
            (root / name / "training_state.pt").write_bytes(b"")
    # step_1000000 sorts before step_999999 as a string: 'latest' and the rotation use the number
    assert [os.path.basename(p) for p in mod.checkpoints(str(tmp_path))] == ["step_000002", "step_999999",
                                                                             "step_1000000"]
    assert mod.checkpoints(str(tmp_path / "nothing")) == []


def test_output_dir_and_resume_are_checked_at_start_up(script, shards, tmp_path):
    mod, argv = script
    out = tmp_path / "run"
    assert mod.check_args(mod.parse_args(argv(shards, out))) is None  # a new folder: a new run
    for flags, says in ((["--resume", "latest"], "no checkpoint"),
                        (["--resume", str(tmp_path)], "no training_state.pt")):
        with pytest.raises(common.UsageError, match=says):
            mod.check_args(mod.parse_args(argv(shards, out, *flags)))
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(common.UsageError, match="--overwrite") as e:
        mod.check_args(mod.parse_args(argv(shards, out)))
    assert "--resume latest" in str(e.value) and "\n" not in str(e.value)
    assert mod.check_args(mod.parse_args(argv(shards, out, "--overwrite"))) is None
    ckpt = out / "checkpoints" / "step_000007"
    ckpt.mkdir(parents=True)
    (ckpt / "training_state.pt").write_bytes(b"")
    assert mod.check_args(mod.parse_args(argv(shards, out, "--resume", "latest"))) == str(ckpt)


def test_resume_refuses_another_lora_or_model_and_continues_otherwise(script, shards, tmp_path):
    mod, argv = script
    out = tmp_path / "run"
    flags = ["--phase_steps", "1", "1", "0", "0", "--checkpoint_every", "1", "--keep_checkpoints", "1"]
    _, step = mod.main(argv(shards, out, *flags, "--max_steps", "1"))
    assert step == 1
    model = mod.parse_args(argv(shards, out)).model
    shutil.copytree(model, tmp_path / "copy")
    for flag, value in (("--lora_alpha", "4"), ("--lora_rank", "2"), ("--model", str(tmp_path / "copy"))):
        with pytest.raises(common.UsageError, match=f"the checkpoint has {flag}"):
            mod.main(argv(shards, out, *flags, "--resume", "latest", flag, value))
    _, step = mod.main(argv(shards, out, *flags, "--resume", "latest"))
    assert step == 2 and [r["step"] for r in metrics(out)] == [1, 2]
    assert os.listdir(out / "checkpoints") == ["step_000002"]  # rotation kept the newest only
    state = load_state(out / "checkpoints" / "step_000002")
    assert state["step"] == 2 and {int(s["step"]) for s in state["opt_g"]["state"].values()} == {2}


def test_nonfinite_losses_skip_updates_then_stop_keeping_the_checkpoint(script, shards, tmp_path):
    mod, argv = script
    out = tmp_path / "run"  # an absurd learning rate blows the LoRA up after the first update
    with pytest.raises(RuntimeError, match="non-finite losses in a row") as e:
        mod.main(argv(shards, out, "--lr", "1e30", "--lr_disc", "1e30", "--phase_steps", "0", "20", "0", "0",
                      "--checkpoint_every", "1"))
    assert f"{out}/checkpoints" in str(e.value)
    ckpts = mod.checkpoints(str(out))
    assert ckpts and load_state(ckpts[-1])["step"] <= 2
    assert open(out / "log.txt").read().count("non-finite loss, update skipped") == mod.MAX_NONFINITE


# ---------------------------------------------------------------------------------------------------------
# separate processes: DDP with torchrun, stop signals
# ---------------------------------------------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import importlib, os, sys, torch
    sys.path.insert(0, {root!r})
    from peft.utils import get_peft_model_state_dict
    mod = importlib.import_module(sys.argv[1])
    out, rank = sys.argv[2], int(os.environ.get("RANK", 0))
    seen, real_step = [], mod.train_step
    def spy(m, student, disc, batch, *a):
        seen.append(list(batch["text"]))
        if len(seen) == 2:
            open(os.path.join(out, f"ready{{rank}}"), "w").close()
        return real_step(m, student, disc, batch, *a)
    mod.train_step = spy
    m, step = mod.main(sys.argv[3:])
    torch.save(dict(step=step, seen=seen, lora=get_peft_model_state_dict(getattr(m, {denoiser!r})),
                    disc=m.disc.state_dict()), os.path.join(out, f"rank{{rank}}.pt"))
""")


def start(cmd, out):
    log = open(os.path.join(out, "stdout.txt"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT))


def wait_for(path, proc, timeout=240):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, open(os.path.join(os.path.dirname(path), "stdout.txt")).read()[-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.5)


def _is_rank1_of(pid, driver):
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return False
    return driver.encode() in cmdline and cmdline[0] != b"" and b"RANK=1" in env and b"-m" not in cmdline[1:2]


def _driver(script, tmp_path):
    mod, _ = script
    out = tmp_path / "run"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, denoiser=SCRIPTS[mod.__name__][2]))
    return mod, out, driver


def test_torchrun_two_processes_stop_together_on_a_signal_to_one_rank(script, shards, tmp_path):
    """DDP on gloo: ranks read different samples, weights stay identical, SIGINT on rank 1 alone stops both
    after one checkpoint."""
    mod, out, driver = _driver(script, tmp_path)
    more = [write_shard(tmp_path / f"more{i}.tar", good_samples(8, np.random.default_rng(10 + i), f"m{i}-"))
            for i in range(2)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           mod.__name__, str(out), *script[1](shards + more, out, "--phase_steps", "0", "500", "0", "0",
                                              "--lr", "3e-3", "--lr_disc", "3e-3", "--overwrite")]
    proc = start(cmd, out)
    try:
        wait_for(out / "ready1", proc)
        pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_rank1_of(int(p), str(driver)))
        os.kill(pid, signal.SIGINT)
        assert proc.wait(timeout=240) == 0, open(out / "stdout.txt").read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] and 2 <= r0["step"] < 500
    assert all(torch.equal(r0["lora"][k], r1["lora"][k]) for k in r0["lora"])
    assert all(torch.equal(r0["disc"][k], r1["disc"][k]) for k in r0["disc"])
    assert max(r0["lora"][k].abs().max() for k in r0["lora"] if "lora_B" in k) > 1e-4  # it trained
    texts0, texts1 = {t for b in r0["seen"] for t in b}, {t for b in r1["seen"] for t in b}
    assert texts0 != texts1  # the ranks read different samples
    assert os.listdir(out / "checkpoints") == [f"step_{r0['step']:06d}"]
    state = load_state(out / "checkpoints" / f"step_{r0['step']:06d}")
    assert all(torch.equal(state["lora"][k], r0["lora"][k]) for k in r0["lora"])
    log = open(out / "log.txt").read()
    assert "stop requested" in log and "2 process(es)" in log
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # stopped early: no final export


def test_sigterm_to_the_process_group_checkpoints_and_stops(script, shards, tmp_path):
    """As SLURM or a terminal does: the signal reaches the data workers too; they must not die first."""
    mod, out, driver = _driver(script, tmp_path)
    proc = start([sys.executable, str(driver), mod.__name__, str(out),
                  *script[1](shards, out, "--phase_steps", "500", "0", "0", "0", "--overwrite", "--num_workers", "2")],
                 out)
    try:
        wait_for(out / "ready0", proc)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, open(out / "stdout.txt").read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    assert os.listdir(out / "checkpoints") == [f"step_{r0['step']:06d}"]
    assert "continue with --resume latest" in open(out / "log.txt").read()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
