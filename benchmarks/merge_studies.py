"""Put algorithms from several studies (each `python -m fastarcher.study`'s study.json) into one table and
plot, e.g. a new ArCHer setting against the baselines of an earlier study on the same preset, seeds and
evaluation episodes. Each source is STUDY_JSON:ALGO[=LABEL]; every source must have the same threshold.

    python benchmarks/merge_studies.py --out docs/results/frozenlake_random4/archer_2per_iter \\
        runs/study_random4_e2/study.json:archer="archer, 2 episodes/iteration" \\
        docs/results/frozenlake_random4/study.json:ppo
"""
import argparse
import json
from pathlib import Path

from fastarcher.study import plot, summarize, table


def parse_source(text: str) -> tuple[Path, str, str]:
    path, _, rest = text.rpartition(":")
    if not path:
        raise SystemExit(f"source {text!r}: give STUDY_JSON:ALGO[=LABEL]")
    algo, _, label = rest.partition("=")
    return Path(path), algo, label or algo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="STUDY_JSON:ALGO[=LABEL]")
    parser.add_argument("--out", required=True, help="folder for study.md, study.json and study.png")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    curves, thresholds, configs = {}, set(), {}
    for source in args.sources:
        path, algo, label = parse_source(source)
        study = json.loads(path.read_text())
        if algo not in study["curves"]:
            raise SystemExit(f"{path} has no algorithm {algo!r} (it has {', '.join(study['curves'])})")
        curves[label] = {int(seed): [tuple(p) for p in curve] for seed, curve in study["curves"][algo].items()}
        thresholds.add(study["config"]["threshold"])
        configs[label] = {"from": str(path), "algo": algo, "config": study["config"]}
    if len(thresholds) != 1:
        raise SystemExit(f"the studies use different thresholds: {sorted(thresholds)}")
    threshold = thresholds.pop()
    rows = summarize(curves, threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"sources": configs, "threshold": threshold, "rows": rows,
                                                "curves": curves}, indent=1) + "\n")
    (out / "study.md").write_text(table(rows, threshold) + "\n\nSources:\n\n" + "\n".join(
        f"- `{label}`: `{c['algo']}` of `{c['from']}` (train flags: {c['config'].get('flags')})"
        for label, c in configs.items()) + "\n")
    plot(curves, out / "study.png", args.title or "greedy success against training episodes")
    print(table(rows, threshold))


if __name__ == "__main__":
    main()
