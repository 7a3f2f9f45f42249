"""Sample-efficiency study (fastarcher/study.py): episode counting, episodes to a threshold, the summary over
seeds by hand; and (slow) a small study end to end through the CLI."""
import json

import pytest

from fastarcher.study import episodes_to_threshold, success_curve, summarize, table


def _row(iteration, success=None, episodes=4, dropped=0, greedy=None):
    row = {"iteration": iteration, "count/rollout_episodes": episodes, "count/rollout_dropped": dropped}
    if greedy is not None:
        row["count/greedy_episodes"] = greedy
    if success is not None:
        row["eval/success_rate"] = success
    return row


def test_success_curve_counts_training_episodes_greedy_baselines_included():
    rows = [_row(0, 0.0, episodes=0), _row(2, None, dropped=1, greedy=2), _row(1, None), _row(3, 0.5), _row(4, 1.0)]
    # iteration 0 is the evaluation before training; 1: 4 episodes; 2: 4 + 1 dropped + 2 greedy; 3, 4: 4 each
    assert success_curve(rows) == [(0.0, 0.0), (15.0, 0.5), (19.0, 1.0)]
    assert episodes_to_threshold(success_curve(rows), 0.5) == 15.0
    assert episodes_to_threshold(success_curve(rows), 1.0) == 19.0
    assert episodes_to_threshold(success_curve(rows)[:2], 0.9) is None


def test_per_algorithm_flags_are_parsed_and_checked():
    from fastarcher.study import StudyConfig

    cfg = StudyConfig(preset="p", algos=("archer", "grpo"), flags=("grpo: --rollout.group-size 4", "grpo: --seed 1"))
    assert cfg.algo_flags() == {"grpo": "--rollout.group-size 4 --seed 1"}
    for bad in ("ppo: --x 1", "--rollout.group-size 4"):
        with pytest.raises(ValueError, match="must be 'ALGO: FLAGS'"):
            StudyConfig(preset="p", algos=("archer", "grpo"), flags=(bad,)).algo_flags()


def test_summary_over_seeds_by_hand():
    curves = {"a": {1: [(0, 0.0), (10, 0.95)], 2: [(0, 0.0), (10, 0.5), (20, 0.9)], 3: [(0, 0.2), (30, 0.4)]},
              "b": {1: [(0, 1.0)]}}
    rows = summarize(curves, 0.9)
    a, b = rows
    assert (a["reached"], a["episodes_median"], a["episodes_min"], a["episodes_max"]) == (2, 15.0, 10, 20)
    assert a["final_mean"] == pytest.approx((0.95 + 0.9 + 0.4) / 3)
    assert a["per_seed"] == {"1": 10, "2": 20, "3": None}
    assert (b["reached"], b["episodes_median"], b["final_std"]) == (1, 0, 0.0)
    text = table(rows, 0.9)
    assert "| `a` | 2/3 | 15 [10, 20] |" in text and "3: —" in text


def test_runs_go_jobs_at_a_time_with_a_log_each_and_a_failure_stops_the_study(tmp_path):
    import subprocess
    import sys
    import time

    from fastarcher.study import run_all

    def sleeper(name):  # records its start and end times, so overlap can be checked
        code = f"import time; print('start', time.time()); time.sleep(0.5); print('end', time.time())"
        return (name, [sys.executable, "-c", code], tmp_path / name)

    run_all([sleeper("a"), sleeper("b"), sleeper("c")], jobs=2)
    spans = {}
    for name in "abc":
        words = (tmp_path / name / "train.log").read_text().split()
        spans[name] = (float(words[1]), float(words[3]))
    starts = sorted(spans.values())
    assert starts[1][0] < starts[0][1]  # the first two overlap
    assert starts[2][0] >= min(end for _, end in starts[:2]) - 1e-3  # the third waits for a free slot

    failing = ("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "bad")
    start = time.time()
    with pytest.raises(subprocess.CalledProcessError) as info:
        run_all([failing], jobs=2)
    assert info.value.returncode == 3 and "bad" in info.value.output and time.time() - start < 30
    assert "boom" in (tmp_path / "bad" / "train.log").read_text()


def test_held_threshold_counts_the_last_evaluations_after_the_start_by_hand():
    from fastarcher.study import held_threshold

    rows = [_row(0, 1.0, episodes=0), _row(1, 0.95), _row(2, 0.5), _row(3, 0.9), _row(4, None), _row(5, 1.0)]
    assert held_threshold(rows, 0.9, 2)  # evaluations after the start: 0.95, 0.5, 0.9, 1.0
    assert not held_threshold(rows, 0.9, 3)  # 0.5 is among the last three
    assert not held_threshold(rows[:2], 0.9, 2)  # one evaluation after the start: not enough
    assert not held_threshold(rows[:1], 0.5, 1)  # the evaluation before training never counts
    assert not held_threshold(rows, 0.9, 0)


def test_a_run_is_stopped_with_sigterm_once_the_predicate_holds_and_partial_lines_are_skipped(tmp_path):
    import sys
    import time

    from fastarcher.study import STOP_FILE, read_rows, run_all

    run_dir = tmp_path / "run"
    # writes one metrics row per 0.1 s, success rising; a cut last line first; exits 0 on SIGTERM after a mark
    code = f"""
import json, signal, sys, time, pathlib
path = pathlib.Path({str(run_dir)!r}) / "metrics.jsonl"
path.write_text('{{"iteration": 0, "eval/success_rate": 0.0}}\\n{{"iterat')
def bye(*_):
    print("got SIGTERM", flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, bye)
time.sleep(0.3)
path.write_text('{{"iteration": 0, "eval/success_rate": 0.0}}\\n')
for it in range(1, 600):
    with path.open("a") as f:
        f.write(json.dumps({{"iteration": it, "count/rollout_episodes": 4, "eval/success_rate": min(1.0, it / 10)}}) + "\\n")
    time.sleep(0.1)
"""
    run_dir.mkdir()
    seen = []

    def stop(rows):
        seen.append(len(rows))
        return bool(rows) and rows[-1].get("eval/success_rate", 0) >= 1.0

    start = time.time()
    run_all([("r", [sys.executable, "-c", code], run_dir)], jobs=2, stop=stop, poll_s=0.05)
    assert time.time() - start < 20  # ended well before its 60 s
    rows = read_rows(run_dir)
    assert 10 <= rows[-1]["iteration"] < 100 and (run_dir / STOP_FILE).is_file()
    assert "got SIGTERM" in (run_dir / "train.log").read_text()
    assert 1 in seen  # polls while the cut line was there read the whole row before it
    with pytest.raises(json.JSONDecodeError):  # outside a running run, a cut line is an error
        (tmp_path / "cut").mkdir()
        (tmp_path / "cut" / "metrics.jsonl").write_text('{"iteration": 0}\n{"iter')
        read_rows(tmp_path / "cut")


@pytest.mark.slow
def test_a_small_study_runs_summarises_and_resumes(tmp_path):
    from dist_helpers import REPO, describe, run_python

    out = tmp_path / "study"
    common = ("--device cpu --rollout.num-envs 4 --eval.episodes 2 --eval.every 1 --eval.no-random-baseline "
              "--archer.batch-size 4 --archer.critic-epochs 1 --archer.warmup-iterations 1 --model.num-layers 1 "
              "--critic.num-layers 1 --checkpoint.no-export-hf")
    args = ["-m", "fastarcher.study", "--preset", "configs/tiny_cpu.yaml", "--algos", "archer", "grpo",
            "--seeds", "3", "4", "--episodes", "8", "--threshold", "0.5", "--out", str(out), f"--common={common}",
            "--flags", "grpo: --rollout.group-size 2", "--jobs", "2"]
    proc = run_python(args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, describe(proc)
    result = json.loads((out / "study.json").read_text())
    assert result["iterations"] == {"archer": 2, "grpo": 2} and [r["algo"] for r in result["rows"]] == ["archer", "grpo"]
    for algo in ("archer", "grpo"):
        for seed in ("3", "4"):
            curve = result["curves"][algo][seed]
            assert [e for e, _ in curve] == [0.0, 4.0, 8.0]  # evaluations before training and after each iteration
    log = (out / "runs" / "grpo_s4" / "train.log").read_text()  # jobs > 1: a log per run, the trainer's output
    assert "algo=grpo" in log and "run folder:" in log
    assert (out / "study.png").stat().st_size > 0 and "episodes to 0.5" in (out / "study.md").read_text()
    again = run_python(args, cwd=REPO, timeout=120)  # every run is complete: nothing runs again
    assert again.returncode == 0 and "study: archer seed" not in again.stdout
