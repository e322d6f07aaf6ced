"""Run plumbing: every script writes out its own process group, DDP wrap, checkpoints, resume and signal
handling, as the same text (tests/test_plumbing.py holds it so). Its behaviours are tested here once, on
flash_sd.py, through main(argv) or as real torchrun processes; what differs per backbone (two ranks ending
with the same weights, the command line's one-line errors) is tested on every script, sharing launches."""
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, good_samples, load_state, metrics, write_shard

import common
import flash_sd


@pytest.fixture
def sd(sd_model):
    """(flash_sd, argv builder) on the tiny SD1.5 model: the plumbing is the same text in every script."""
    def argv(shards, out, *more):
        return ["--model", sd_model, "--shards", *shards, "--output_dir", str(out), "--resolution", "32",
                "--batch_size", "2", "--phase_steps", "1", "1", "1", "1", "--num_teacher_steps", "4",
                "--mixed_precision", "no", "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8",
                "--distill_loss", "l2", "--log_every", "1", "--sample_every", "100", "--checkpoint_every", "100",
                "--validation_prompts", "a red square", *more]
    return flash_sd, argv


def test_checkpoint_folders_are_ordered_by_step_and_skip_interrupted_writes(sd, tmp_path):
    mod, _ = sd
    root = tmp_path / "checkpoints"
    for name in ("step_999999", "step_1000000", "step_000002", "step_1000001.tmp", "step_000003"):
        (root / name).mkdir(parents=True)
        if name != "step_000003":  # no training_state.pt: not a complete checkpoint
            (root / name / "training_state.pt").write_bytes(b"")
    # step_1000000 sorts before step_999999 as a string: 'latest' and the rotation use the number
    assert [os.path.basename(p) for p in mod.checkpoints(str(tmp_path))] == ["step_000002", "step_999999",
                                                                             "step_1000000"]
    assert mod.checkpoints(str(tmp_path / "nothing")) == []


def mount_tmpfs(path, options):
    """A small tmpfs at `path` (a full disk or a read-only one, for real); skips the test where mounting is
    not allowed."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def test_output_dir_and_resume_are_checked_at_start_up(sd, shards, tmp_path):
    mod, argv = sd
    out = tmp_path / "run"
    assert mod.find_resume(mod.parse_args(argv(shards, out))) == []  # a new folder: a new run
    for check, flags, says in ((mod.find_resume, ["--resume", "latest"], "no checkpoint"),
                               (mod.find_resume, ["--resume", str(tmp_path)], "no training_state.pt"),
                               (mod.check_flags, ["--validation_prompts", "a cat", " "], "an empty prompt"),
                               (mod.check_args, ["--model", "nobody/no-model"], "not a local folder, and the Hug")):
        with pytest.raises(common.UsageError, match=says) as e:
            check(mod.parse_args(argv(shards, out, *flags)))
        assert "\n" not in str(e.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(common.UsageError, match="a file, not a folder"):
        mod.find_resume(mod.parse_args(argv(shards, tmp_path / "a_file")))
    # a start that failed before its first checkpoint leaves an empty checkpoints/: a new start is fine there
    (out / "checkpoints").mkdir(parents=True)
    assert mod.find_resume(mod.parse_args(argv(shards, out))) == []
    (out / "metrics.jsonl").write_text("{}\n")  # metrics but no checkpoint: nothing to resume, so say --overwrite
    with pytest.raises(common.UsageError, match="wrote no checkpoint") as e:
        mod.find_resume(mod.parse_args(argv(shards, out)))
    assert "--overwrite" in str(e.value) and "--resume" not in str(e.value)
    assert mod.find_resume(mod.parse_args(argv(shards, out, "--overwrite"))) == []
    for name in ("step_000007", "step_000012"):
        (out / "checkpoints" / name).mkdir()
        (out / "checkpoints" / name / "training_state.pt").write_bytes(b"")
    with pytest.raises(common.UsageError, match="--resume latest"):
        mod.find_resume(mod.parse_args(argv(shards, out)))
    assert mod.find_resume(mod.parse_args(argv(shards, out, "--resume", "latest"))) == [
        str(out / "checkpoints" / "step_000012"), str(out / "checkpoints" / "step_000007")]  # newest first


def test_a_read_only_output_dir_is_one_clear_error(sd, shards, tmp_path):
    mod, argv = sd
    mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    try:
        with pytest.raises(common.UsageError, match="cannot write there .Read-only file system.") as e:
            mod.find_resume(mod.parse_args(argv(shards, tmp_path / "ro" / "run")))
        assert "\n" not in str(e.value)
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")])


def test_resume_refuses_another_lora_or_model_and_falls_back_past_an_unreadable_checkpoint(sd, shards, tmp_path):
    mod, argv = sd
    out = tmp_path / "run"
    flags = ["--phase_steps", "1", "1", "1", "0", "--checkpoint_every", "1", "--keep_checkpoints", "0"]
    _, step = mod.main(argv(shards, out, *flags, "--max_steps", "2"))
    assert step == 2 and sorted(os.listdir(out / "checkpoints")) == ["step_000001", "step_000002"]
    model = mod.parse_args(argv(shards, out)).model
    shutil.copytree(model, tmp_path / "copy")
    for flag, value in (("--lora_alpha", "4"), ("--lora_rank", "2"), ("--model", str(tmp_path / "copy"))):
        with pytest.raises(common.UsageError, match=f"the checkpoint has {flag}"):
            mod.main(argv(shards, out, *flags, "--resume", "latest", flag, value))
    # the newest checkpoint truncated (a lost node, a bad copy): resume names it and takes the next newest,
    # which says it was written by 2 processes, so the log says what changes with 1
    first = load_state(out / "checkpoints" / "step_000001")
    torch.save(dict(first, world_size=2), out / "checkpoints" / "step_000001" / "training_state.pt")
    newest = out / "checkpoints" / "step_000002" / "training_state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    _, step = mod.main(argv(shards, out, *flags, "--resume", "latest", "--keep_checkpoints", "1"))
    assert step == 3 and [r["step"] for r in metrics(out)] == [1, 2, 2, 3]  # step 2 done again
    log = open(out / "log.txt").read()
    assert f"{newest} does not load" in log and f"resumed from {out}/checkpoints/step_000001 at step 1" in log
    assert "'world_size': (2, 1)" in log and "'global_batch': (4, 2)" in log
    assert "command: " in log and '"lora_rank": 4' in log  # the command line and the resolved flags
    assert os.listdir(out / "checkpoints") == ["step_000003"]  # rotation kept the newest only
    state = load_state(out / "checkpoints" / "step_000003")
    assert state["step"] == 3 and state["world_size"] == 1
    assert {int(s["step"]) for s in state["opt_g"]["state"].values()} == {3}  # AdamW continued from step 1
    # nothing loads: one clear stop
    (out / "checkpoints" / "step_000003" / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.RunError, match="no checkpoint loads"):
        mod.main(argv(shards, out, *flags, "--resume", "latest"))
    # written by an earlier version, without world_size and nonfinite: it resumes, the world size unknown
    old = {k: v for k, v in state.items() if k not in ("world_size", "nonfinite")}
    torch.save(old, out / "checkpoints" / "step_000003" / "training_state.pt")
    _, step = mod.main(argv(shards, out, *flags, "--resume", "latest", "--phase_steps", "1", "1", "1", "1"))
    assert step == 4 and "'world_size': (None, 1)" in open(out / "log.txt").read()
    assert load_state(out / "checkpoints" / "step_000004")["nonfinite"] == 0
    # without the head's weights: one line that names what is missing and what to do
    torch.save({k: v for k, v in old.items() if k != "disc"}, out / "checkpoints" / "step_000004" / "training_state.pt")
    with pytest.raises(common.RunError) as e:
        mod.main(argv(shards, out, *flags, "--resume", "latest", "--phase_steps", "1", "1", "1", "2"))
    assert "step_000004 has no disc: not a checkpoint of flash_sd.py" in str(e.value) and "\n" not in str(e.value)
    assert "--overwrite" in str(e.value)


def test_a_full_disk_while_checkpointing_stops_cleanly_and_keeps_the_checkpoints(sd, shards, tmp_path):
    mod, argv = sd
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    mount_tmpfs(ckpts, "size=256m")
    try:
        flags = ["--phase_steps", "1", "1", "0", "0", "--checkpoint_every", "1", "--keep_checkpoints", "0"]
        mod.main(argv(shards, out, *flags, "--max_steps", "1"))
        used = sum(f.stat().st_size for f in (ckpts / "step_000001").iterdir())
        subprocess.run(["mount", "-o", f"remount,size={used // 1024 + 64}k", str(ckpts)], check=True)
        with pytest.raises(common.RunError) as e:
            mod.main(argv(shards, out, *flags, "--resume", "latest"))
        msg = str(e.value)
        assert f"checkpoint {ckpts}/step_000002 could not be written (no space left on device: " in msg
        assert "MB free, about" in msg and "MB needed" in msg and "the earlier checkpoints are intact" in msg and "\n" not in msg
        assert os.listdir(ckpts) == ["step_000001"]  # the half-written .tmp folder is gone, the old one kept
        assert load_state(ckpts / "step_000001")["step"] == 1
    finally:
        subprocess.run(["umount", str(ckpts)])


def test_nonfinite_losses_skip_updates_then_stop_keeping_the_checkpoint(sd, shards, tmp_path):
    mod, argv = sd
    out = tmp_path / "run"  # an absurd learning rate blows the LoRA up after the first update
    with pytest.raises(common.RunError, match="non-finite losses in a row") as e:
        mod.main(argv(shards, out, "--lr", "1e30", "--lr_disc", "1e30", "--phase_steps", "0", "20", "0", "0",
                      "--checkpoint_every", "1"))
    ckpts = mod.checkpoints(str(out))
    assert f"the last good checkpoint is {ckpts[-1]}" in str(e.value)
    assert load_state(ckpts[-1])["step"] <= 2
    assert open(out / "log.txt").read().count("non-finite loss, update skipped") == mod.MAX_NONFINITE
    with pytest.raises(common.RunError, match="no checkpoint was written yet"):  # not a pointer to nothing
        mod.main(argv(shards, tmp_path / "early", "--lr", "1e30", "--lr_disc", "1e30", "--phase_steps", "0", "20",
                      "0", "0"))


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
    torch.save(dict(step=step, seen=seen, lora=get_peft_model_state_dict(m.denoiser),
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


def _driver(sd, tmp_path):
    mod, _ = sd
    out = tmp_path / "run"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    return mod, out, driver


def test_torchrun_two_processes_stop_together_on_a_signal_to_one_rank(sd, shards, tmp_path):
    """DDP on gloo: ranks read different samples, weights stay identical, SIGINT on rank 1 alone stops both
    after one checkpoint."""
    mod, out, driver = _driver(sd, tmp_path)
    more = [write_shard(tmp_path / f"more{i}.tar", good_samples(8, np.random.default_rng(10 + i), f"m{i}-"))
            for i in range(2)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           mod.__name__, str(out), *sd[1](shards + more, out, "--phase_steps", "0", "500", "0", "0",
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


def test_sigterm_to_the_process_group_checkpoints_and_stops(sd, shards, tmp_path):
    """As SLURM or a terminal does: the signal reaches the data workers too; they must not die first."""
    mod, out, driver = _driver(sd, tmp_path)
    proc = start([sys.executable, str(driver), mod.__name__, str(out),
                  *sd[1](shards, out, "--phase_steps", "500", "0", "0", "0", "--overwrite", "--num_workers", "2")],
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


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_script_names_a_model_it_cannot_read_in_one_line(request, name, shards, tmp_path):
    """Each backbone's check_args, before any model loads: a hub id that does not download, a folder
    without that backbone's layout."""
    mod = importlib.import_module(name)
    fixture, extra = SCRIPTS[name]
    model = request.getfixturevalue(fixture)
    flags = ["--shards", *shards, "--output_dir", str(tmp_path / "out"), *(e.format(model=model) for e in extra)]
    for bad, says in (("nobody/no-model", "not a local folder, and the Hugging Face Hub could not provide it"),
                      (str(tmp_path), "cannot read")):
        with pytest.raises(common.UsageError, match=says) as e:
            mod.check_args(mod.parse_args(["--model", bad, *flags]))
        assert str(e.value).startswith(f"--model {bad}") and "\n" not in str(e.value)


EVERY_DRIVER = textwrap.dedent("""
    import importlib, json, os, sys, torch
    sys.path.insert(0, {root!r})
    from peft.utils import get_peft_model_state_dict
    rank = int(os.environ["RANK"])
    for name, (port, argv) in json.loads(sys.argv[1]).items():  # every backbone in turn, in the same two processes
        os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="False")  # a fresh store each time
        mod = importlib.import_module(name)
        seen, real_step = [], mod.train_step
        def spy(m, student, disc, batch, *a, seen=seen, real_step=real_step):
            seen.append(list(batch["text"]))
            return real_step(m, student, disc, batch, *a)
        mod.train_step = spy
        m, step = mod.main(argv)
        t5 = m.uncond["text"][:, 77:].abs().max() if name == "flash_sd3" else None
        torch.save(dict(step=step, seen=seen, lora=get_peft_model_state_dict(m.denoiser), disc=m.disc.state_dict(), t5=t5),
                   os.path.join(argv[argv.index("--output_dir") + 1], f"rank{{rank}}.pt"))
""")


@pytest.fixture(scope="module")
def every_backbone_on_two_ranks(request, shards, tmp_path_factory):
    """One torchrun launch: two gloo ranks train each backbone for two updates of phase 1 (every loss on),
    on more shards than ranks so that the ranks read different samples; SD3 with T5."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    more = [write_shard(tmp / f"more{i}.tar", good_samples(8, np.random.default_rng(10 + i), f"m{i}-")) for i in range(2)]
    runs = {}
    for name, (fixture, extra) in SCRIPTS.items():
        model = request.getfixturevalue(fixture)
        with socket.socket() as sock:  # a free port for this script's process group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        runs[name] = port, ["--model", model, *(e.format(model=model) for e in extra), "--shards", *shards, *more,
                      "--output_dir", str(tmp / name), "--resolution", "32", "--batch_size", "2",
                      "--phase_steps", "0", "2", "0", "0", "--num_teacher_steps", "4", "--mixed_precision", "no",
                      "--num_workers", "1", "--lora_rank", "4", "--lora_alpha", "8", "--distill_loss", "l2",
                      "--lr", "3e-3", "--lr_disc", "3e-3", "--sample_every", "100", "--checkpoint_every", "100",
                      "--validation_prompts", "a red square", *(["--use_t5"] if name == "flash_sd3" else [])]
    driver = tmp / "driver.py"
    driver.write_text(EVERY_DRIVER.format(root=ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
                        json.dumps(runs)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {name: [torch.load(tmp / name / f"rank{i}.pt", weights_only=True) for i in (0, 1)] + [tmp / name]
            for name in SCRIPTS}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_two_ranks_read_different_samples_and_end_with_the_same_weights(every_backbone_on_two_ranks, name):
    r0, r1, out = every_backbone_on_two_ranks[name]
    assert r0["step"] == r1["step"] == 2
    assert all(torch.equal(r0["lora"][k], r1["lora"][k]) for k in r0["lora"])
    assert all(torch.equal(r0["disc"][k], r1["disc"][k]) for k in r0["disc"])
    assert max(r0["lora"][k].abs().max() for k in r0["lora"] if "lora_B" in k) > 1e-4  # it trained
    assert {t for b in r0["seen"] for t in b} != {t for b in r1["seen"] for t in b}
    assert "2 process(es)" in open(out / "log.txt").read()
    assert (out / "pytorch_lora_weights.safetensors").exists() or (out / "adapter_model.safetensors").exists()
    if name == "flash_sd3":  # T5 states, not zeros, in the conditioning, the same on both ranks
        assert r0["t5"] > 0.1 and torch.equal(r0["t5"], r1["t5"])


CLI_DRIVER = textwrap.dedent("""
    import json, os, runpy, sys
    sys.path.insert(0, {root!r})
    out = {{}}
    for key, argv in json.loads(sys.argv[1]).items():  # each script's __main__, as `python flash_x.py ...` runs it
        name = key.split(":")[0]
        sys.argv = [name + ".py", *argv]
        try:
            runpy.run_path(os.path.join({root!r}, name + ".py"), run_name="__main__")
            out[key] = None
        except SystemExit as e:
            out[key] = str(e.code)
    import common  # the real LPIPS, its weights not downloadable: one line that says where to put them
    try:
        common.make_lpips()
        out["lpips"] = None
    except common.UsageError as e:
        out["lpips"] = str(e)
    print(json.dumps(out))
""")


def test_failures_end_with_one_line_naming_the_cause_and_the_traceback_goes_to_the_log(request, shards, tmp_path):
    """Each script's command line, run as `python flash_x.py`: a pipe: shard command that fails stops with one
    line (its SystemExit message: exit status 1), and the traceback is in log.txt instead; missing shards stop
    before anything loads; all in one process."""
    runs = {}
    for name, (fixture, extra) in SCRIPTS.items():
        model = request.getfixturevalue(fixture)
        runs[name] = ["--model", model, *(e.format(model=model) for e in extra), "--shards", "pipe:false",
                      "--output_dir", str(tmp_path / name), "--resolution", "32", "--batch_size", "2",
                      "--num_teacher_steps", "4", "--mixed_precision", "no", "--num_workers", "0", "--lora_rank", "4",
                      "--distill_loss", "l2", "--validation_prompts", "a red square"]
    runs["flash_sd:no shards"] = ["--shards", str(tmp_path / "none.tar"), "--output_dir", str(tmp_path / "o")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "torch_home"),
               https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")  # no download can start
    r = subprocess.run([sys.executable, "-c", CLI_DRIVER.format(root=ROOT), json.dumps(runs)], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in SCRIPTS:
        msg = out[name]
        assert msg.startswith(f"{name}.py: error: --shards: 50 read errors and not one sample read (last: "), msg
        assert "pipe:false" in msg and "a pipe: command runs on its own" in msg and "\n" not in msg
        log = open(tmp_path / name / "log.txt").read()
        assert "Traceback (most recent call last)" in log and "RunError" in log
    assert out["flash_sd:no shards"].startswith("flash_sd.py: error: --shards")  # checked before anything loads
    assert "\n" not in out["flash_sd:no shards"]
    assert "Traceback" not in r.stderr
    msg = out["lpips"]
    assert msg.startswith("--distill_loss lpips needs torchvision's VGG16 weights") and "\n" not in msg
    assert "vgg16-397923af.pth into ~/.cache/torch/hub/checkpoints/" in msg and "--distill_loss l2" in msg


@pytest.mark.parametrize("name", ["flash_adapter", "flash_pixart", "flash_sd", "flash_sdxl"])
def test_a_prediction_type_a_script_has_no_formulas_for_is_refused(request, name, shards, tmp_path):
    """The UNet scripts' x0 and DMD formulas are epsilon's and v's, PixArt's epsilon's only: a model whose
    scheduler says otherwise would train wrong without a word, so it stops at start-up in one line."""
    mod = importlib.import_module(name)
    fixture, extra = SCRIPTS[name]
    for predicts in ("sample", "v_prediction"):
        model = tmp_path / predicts
        shutil.copytree(request.getfixturevalue(fixture), model)
        config = model / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps(dict(json.loads(config.read_text()), prediction_type=predicts)))
        flags = ["--shards", *shards, "--output_dir", str(tmp_path / "out"), *(e.format(model=model) for e in extra)]
        args = mod.parse_args(["--model", str(model), *flags])
        if predicts == "v_prediction" and name != "flash_pixart":
            mod.check_args(args)  # read from the config and trained as v (tests/test_v_prediction.py)
            continue
        with pytest.raises(common.UsageError) as e:
            mod.check_args(args)
        supported = "epsilon-prediction models only" if name == "flash_pixart" else "epsilon and v_prediction models"
        assert str(e.value) == (f"--model {model}: its scheduler's prediction_type is {predicts}; this script "
                                f"distils {supported}")
