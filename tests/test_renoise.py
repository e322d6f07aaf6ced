"""--renoise: the noise level of DMD's y and of the discriminator's inputs. "original" (the default)
reproduces the original code, which re-noised through the teacher's DPMSolverMultistepScheduler.add_noise
after set_timesteps(K): t where it is on the K-step grid, else the grid's last step; "true" noises at t's
own level. The networks and DMD's coefficient are told the nominal t either way."""
import pytest
import torch

import common

EPSILON_SCRIPTS = ["flash_adapter", "flash_pixart", "flash_sd", "flash_sdxl"]


def test_the_original_level_is_the_grids_last_step_off_the_grid():
    grid = torch.tensor([999, 749, 499, 249])
    t = torch.tensor([999, 500, 249, 10, 750])
    assert common.renoise_level(t, grid, "original").tolist() == [999, 249, 249, 249, 249]
    assert common.renoise_level(t, grid, "true") is t


@pytest.mark.parametrize("kind", [None, "true"])
def test_train_step_renoises_as_the_teachers_add_noise_after_set_timesteps(script, shards, tmp_path, monkeypatch,
                                                                         kind):
    """One phase-1 step (DMD and the GAN on) of each epsilon script: every re-noised DMD and discriminator
    input equals DPMSolverMultistepScheduler.add_noise at the nominal t on the script's own teacher scheduler
    after set_timesteps(K) ("original", the default), or the true level ("true"); the networks get the nominal t."""
    mod, argv = script
    if mod.__name__ not in EPSILON_SCRIPTS:
        pytest.skip("flow matching: the original SD3 code noised at the true sigma")
    args = mod.parse_args(argv(shards, tmp_path / "run", "--phase_steps", "0", "1", "0", "0", "--num_teacher_steps",
                               "8", *([] if kind is None else ["--renoise", kind])))
    assert args.renoise == (kind or "original")  # the original code's levels unless asked
    kind = args.renoise
    torch.manual_seed(0)
    m = mod.build(args, torch.device("cpu"))
    batch = next(iter(common.make_loader(args.shards, args.resolution, 2, num_workers=0, min_aesthetic=-1,
                                         extra=m.extra)))
    nominal, calls = {}, []
    real_level, real_renoise = common.renoise_level, common.renoise

    def level(t, grid, k):
        out = real_level(t, grid, k)
        nominal[id(out)] = (t.clone(), out)
        return out

    def renoise(x0, noise, t, abar):
        out = real_renoise(x0, noise, t, abar)
        calls.append((x0.detach().clone(), noise.clone(), t, out.detach().clone()))
        return out

    monkeypatch.setattr(common, "renoise_level", level)
    monkeypatch.setattr(common, "renoise", renoise)
    mod.train_step(m, m.denoiser, m.disc, batch, 0, args)
    checked = [(x0, n, nominal[id(t)][0], out) for x0, n, t, out in calls if id(t) in nominal]
    assert len(checked) == 3  # DMD's y, the discriminator's fake and real inputs
    teacher = type(m.teacher_sched).from_config(m.teacher_sched.config)
    teacher.set_timesteps(args.num_teacher_steps)
    grid = set(teacher.timesteps.tolist())
    off_grid = 0
    for x0, n, t, out in checked:
        off_grid += sum(v not in grid for v in t.tolist())
        if kind == "original":
            expected = teacher.add_noise(x0, n, t)
        else:
            a = m.alphas_cumprod[t].view(-1, 1, 1, 1)
            expected = a.sqrt() * x0 + (1 - a).sqrt() * n
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert off_grid > 0  # the GAN's levels 250, 500, 750 are off an 8-step trailing grid
