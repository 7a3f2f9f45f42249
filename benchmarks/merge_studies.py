"""Put algorithms from several studies (each `python -m fastarcher.study`'s study.json) into one table and
plot, e.g. a new ArCHer setting against the baselines of an earlier study on the same preset, seeds and
evaluation episodes. Each source is STUDY_JSON:ALGO[=LABEL]; every source must have the same threshold; a
LABEL given twice gathers the seeds of both sources (studies of the same setting on other seeds).

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
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="keep only these seeds")
    args = parser.parse_args(argv)
    curves, thresholds, configs = {}, set(), {}
    for source in args.sources:
        path, algo, label = parse_source(source)
        study = json.loads(path.read_text())
        if algo not in study["curves"]:
            raise SystemExit(f"{path} has no algorithm {algo!r} (it has {', '.join(study['curves'])})")
        by_seed = {int(seed): [tuple(p) for p in curve] for seed, curve in study["curves"][algo].items()}
        curves.setdefault(label, {}).update(  # a label given twice gathers the seeds of both sources
            {seed: curve for seed, curve in by_seed.items() if args.seeds is None or seed in args.seeds})
        curves[label] = dict(sorted(curves[label].items()))
        thresholds.add(study["config"]["threshold"])
        configs.setdefault(label, []).append({"from": str(path), "algo": algo, "config": study["config"]})
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
        for label, sources in configs.items() for c in sources) + "\n")
    plot(curves, out / "study.png", args.title or "greedy success against training episodes")
    print(table(rows, threshold))


if __name__ == "__main__":
    main()
