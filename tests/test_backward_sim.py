"""--backward_sim on each script: for a start index k > 0, x_t is built from the student's own detached
sampler (from pure noise, over the 4-step grid levels above k, fresh noise between its steps) instead of a
data latent, re-noised with the data's noise to the data's level; off by default (the paper's recipe).
The real train_step runs; the spies only record what it computes."""
import pytest
import torch

import common

# per script: the forward process and the one-step x0 it uses (a common function or the script's own)
FORWARD = {"flash_sd3": ("renoise_flow", "x0_from_v"), "flash_flux": ("renoise_flow", "x0_from_v")}


def one_step(mod, m, args, monkeypatch, batch):
    """One train_step at a fixed k = K/2, recording every forward-process call, every one-step x0 and what the
    teacher solves from."""
    forward_name, x0_name = FORWARD.get(mod.__name__, ("renoise", "lcm_x0"))
    x0_owner = mod if x0_name == "x0_from_v" else common
    seen = dict(forward=[], x0=[], solve=[])
    real_forward, real_x0, real_solve = getattr(common, forward_name), getattr(x0_owner, x0_name), mod.teacher_solve

    def forward(x0, noise, level, *rest):
        out = real_forward(x0, noise, level, *rest)
        seen["forward"].append((x0, noise, level, out))
        return out

    def x0_of(x, pred, level, *rest):
        seen["x0"].append((x, level))
        return real_x0(x, pred, level, *rest)

    monkeypatch.setattr(common, forward_name, forward)
    monkeypatch.setattr(x0_owner, x0_name, x0_of)
    monkeypatch.setattr(mod, "teacher_solve", lambda m, x_t, k, c, *rest: seen["solve"].append((x_t, k, c, rest))
                        or real_solve(m, x_t, k, c, *rest))
    K = args.num_teacher_steps
    m.start_probs = [torch.eye(K)[K // 2]] * 4  # every phase starts at k = K/2
    torch.manual_seed(0)
    losses = mod.train_step(m, m.denoiser, m.disc, batch, 0, args)
    assert all(torch.isfinite(v).all() for v in losses.values())
    return seen


@pytest.mark.parametrize("p", [None, 1.0])
def test_backward_sim_builds_x_t_from_the_students_own_sampler_and_is_off_by_default(script, shards, tmp_path,
                                                                                     monkeypatch, p):
    mod, argv = script
    args = mod.parse_args(argv(shards, tmp_path / "run", *([] if p is None else ["--backward_sim", str(p)])))
    assert args.backward_sim == (0.0 if p is None else p)  # the paper's recipe unless asked
    m = mod.build(args, torch.device("cpu"))
    net = m.denoiser
    for name, w in net.named_parameters():  # a trained-looking LoRA: the student differs from the teacher
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.05)
    batch = dict(pixel_values=torch.rand(2, 3, 32, 32) * 2 - 1, text=["a red square", "a blue circle"])
    if mod.__name__ == "flash_adapter":
        batch["edges"] = (torch.rand(2, m.adapter.config.in_channels, 32, 32) > 0.8).float()
    seen = one_step(mod, m, args, monkeypatch, batch)
    (x_t, k, cond, rest), = seen["solve"]
    guidance = rest if mod.__name__ == "flash_flux" else ()  # FLUX's student is given the teacher's g
    data = seen["forward"][0]  # the first forward-process call noises the data latent
    if p is None:  # x_t is the noised data latent; no extra student pass before the student's own step
        assert torch.equal(x_t, data[3])
        assert len(seen["x0"]) == 1 and torch.equal(seen["x0"][0][0], x_t)
        return
    # k = K/2: the extra passes are the student's own sampler from pure noise at grid levels 0 and K/4
    grid, K = (m.sigmas if hasattr(m, "sigmas") else m.teacher_sched.timesteps), args.num_teacher_steps
    (in0, level0), (in1, level1), (in2, _) = seen["x0"]  # then the student's step on x_t
    assert (level0 == grid[0]).all() and (level1 == grid[K // 4]).all() and torch.equal(in2, x_t)
    between, last = seen["forward"][1], seen["forward"][2]
    # between its steps: the first x0, re-noised with fresh noise to level K/4, is the second pass's input
    assert torch.equal(between[3], in1) and (between[2] == grid[K // 4]).all()
    assert not torch.equal(between[1], data[1])
    # the last x0 re-noised with the data's noise to the data's level is x_t
    assert torch.equal(last[1], data[1]) and torch.equal(last[2], data[2]) and torch.equal(x_t, last[3])
    assert not torch.allclose(last[0], data[0])  # x_t from the own output, not data

    def student_x0(x, level):  # the student's (LoRA on) one-step x0, recomputed here
        with torch.no_grad():
            level = level.expand(len(x))
            pred = mod.denoise(net, x, level, cond, *guidance)
            return (mod.x0_from_v(x, pred, level) if hasattr(mod, "x0_from_v")
                    else common.lcm_x0(x, pred, level, m.alphas_cumprod))
    torch.testing.assert_close(between[0], student_x0(in0, level0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last[0], student_x0(in1, level1), rtol=1e-5, atol=1e-5)


def test_backward_sim_must_be_a_probability(script, capsys):
    mod, _ = script  # each script's own parser: the flag's type refuses it before anything loads
    with pytest.raises(SystemExit):
        mod.parse_args(["--shards", "x.tar", "--backward_sim", "1.5"])
    assert "argument --backward_sim: 1.5: a probability: between 0 and 1" in capsys.readouterr().err
