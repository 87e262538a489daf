"""`make demo`'s training loop (python -m pgext.demo), run for a few episodes."""
import math

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")

from pgext import demo  # noqa: E402


def _short(**kw):
    kw.setdefault("episodes", 8)
    return demo.Config(progress=False, **kw)


def test_training_loop_runs_and_times_both_implementations():
    result = demo.train(_short(seed=3))
    assert result.episodes == 8
    assert result.updates == 2  # 4 episodes per update
    assert result.loss_name == "pgext" and result.shadow_name == "reference"
    assert all(math.isfinite(v) for losses in result.losses for v in losses)
    assert all(r >= 1 for r in result.returns)  # CartPole pays 1 per step survived
    assert result.loss_s > 0 and result.shadow_s > 0 and result.wall_s >= result.loss_s
    assert not result.solved


def test_same_seed_same_first_losses():
    a = demo.train(_short(seed=11, episodes=4))
    b = demo.train(_short(seed=11, episodes=4))
    assert a.returns == b.returns
    assert a.first_losses == b.first_losses
    c = demo.train(_short(seed=12, episodes=4))
    assert c.returns != a.returns or c.first_losses != a.first_losses


def test_reference_mode_trains_with_the_reference():
    result = demo.train(_short(seed=3, reference=True, episodes=4))
    assert result.loss_name == "reference" and result.shadow_name == "pgext"
    # the same seed and the same math: the first update's losses agree with pgext's run
    ours = demo.train(_short(seed=3, episodes=4))
    assert result.returns == ours.returns
    for a, b in zip(result.first_losses, ours.first_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_stops_at_target():
    result = demo.train(_short(seed=0, episodes=50, target=10.0))
    assert result.solved and result.solved_at == result.episodes == result.config.window


def test_cli_writes_summary_and_plot(tmp_path, capsys):
    png = tmp_path / "curve.png"
    result = demo.main(["--episodes", "5", "--seed", "1", "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out
    assert result.episodes == 5
    assert "not solved after 5 episodes" in out and "reference/pgext" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("algo", ["a2c", "ppo"])
def test_actor_critic_loops_run_and_time_both_implementations(algo):
    result = demo.train(_short(algo=algo, seed=3))
    assert result.episodes == 8 and result.updates == 2
    assert result.loss_name == "pgext" and result.shadow_name == "reference"
    assert all(math.isfinite(v) for losses in result.losses for v in losses)
    assert result.loss_s > 0 and result.shadow_s > 0


@pytest.mark.parametrize("algo", ["a2c", "ppo"])
def test_actor_critic_reference_mode_matches(algo):
    """The reference's losses train the same run: the same returns and first losses."""
    ref = demo.train(_short(algo=algo, seed=5, reference=True, episodes=4))
    ours = demo.train(_short(algo=algo, seed=5, episodes=4))
    assert ref.loss_name == "reference" and ref.returns == ours.returns
    for a, b in zip(ref.first_losses, ours.first_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_gae_by_hand():
    from pgext.demo.actor_critic import gae

    adv, target = gae([1.0, 1.0], np.array([0.5, 0.25]), gamma=0.5, lam=0.5)
    # delta = [1 + 0.5 * 0.25 - 0.5, 1 - 0.25] = [0.625, 0.75]; adv = [0.625 + 0.25 * 0.75, 0.75]
    assert adv.tolist() == pytest.approx([0.8125, 0.75]) and target.tolist() == pytest.approx([1.3125, 1.0])


def test_cli_several_algorithms_one_plot(tmp_path, capsys):
    png = tmp_path / "curves.png"
    results = demo.main(["--algo", "reinforce,ppo", "--episodes", "4", "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out
    assert [r.config.algo for r in results] == ["reinforce", "ppo"]
    assert "REINFORCE (pg_error)" in out and "PPO (ppo_error)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit):
        demo.parse_args(["--episodes", "0"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--algo", "ppo,dqn"])
    with pytest.raises(ValueError, match="algo must be one of"):
        demo.train(_short(algo="dqn"))


def test_token_level_example_runs_and_matches(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "token_level_pg.py"), "--vocab", "700", "--batch", "3",
         "--seq", "16", "--repeats", "1"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "padded tokens' dlogits all 0: yes -> match" in proc.stdout, proc.stdout[-3000:]


def test_token_level_ppo_example_runs_and_matches():
    """examples/token_level_ppo.py at a small size: pgext and the TRL-style
    composition agree (loss, gradient, both against float64) and padding gets
    no gradient."""
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "token_level_ppo.py"), "--vocab", "700", "--batch", "4",
         "--group", "2", "--seq", "16", "--repeats", "1"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "padded tokens' gradients all 0: yes" in proc.stdout, proc.stdout[-3000:]
    assert "pgext and the composition agree: yes" in proc.stdout, proc.stdout[-3000:]


def test_token_level_ppo_example_fused_head_runs_and_matches():
    """examples/token_level_ppo.py --fused-head at a small size: linear_log_prob_entropy and
    F.linear then log_prob_entropy agree (log_prob, entropy, loss, gradients to the hidden states,
    the weight and the bias) and padding gets no gradient."""
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "token_level_ppo.py"), "--fused-head", "--bias", "--vocab", "700",
         "--hidden", "64", "--batch", "4", "--group", "2", "--seq", "16", "--repeats", "1"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "padded tokens' hidden gradients all 0: yes" in proc.stdout, proc.stdout[-3000:]
    assert "fused and unfused agree: yes" in proc.stdout, proc.stdout[-3000:]
    assert "gradients for the same upstream gradients: hidden" in proc.stdout, proc.stdout[-3000:]
