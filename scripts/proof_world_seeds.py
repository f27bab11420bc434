#!/usr/bin/env python
"""Does the proof world's recipe hold beyond the seed it was tuned on? Train it with several training
seeds (other instance images, other noise and data order), judge each run on two disjoint eval-seed
sets, and report the mean and the worst seed against the targets of docs/proof-world.md ("Over
training seeds").

    # the recipe of the slow CI test (demo_config()), training seeds 0, 1, 2, eval seeds 1000+ and 1500+
    OMP_NUM_THREADS=1 python scripts/proof_world_seeds.py --name recipe
    # a variant: any ExperimentConfig or TrainConfig field, as in scripts/proof_world_probe.py
    OMP_NUM_THREADS=1 python scripts/proof_world_seeds.py --name shuffle --set shuffle_caption=true
    # the demo's quick variant (250 steps at lr 2e-4, 15 sampler steps)
    OMP_NUM_THREADS=1 python scripts/proof_world_seeds.py --name demo --quick
    # on another base, judged by the judges trained with its styles (docs/proof-world.md, stage 5)
    OMP_NUM_THREADS=1 python scripts/proof_world_seeds.py --name base5 --set base_model=WORK/base5 --judges WORK/judges.safetensors

Each (training seed, eval set) writes WORK/NAME/seed-S/eval-E.json; a rerun with the same settings
reuses them. The table goes to WORK/NAME/table.md and one summary line to WORK/summary.md. Metrics:
hit (token prompts judged yltcaxe), leak (plain and "..., artstyle" prompts judged yltcaxe), subject
and colour with the token ("a yellow star, yltcaxe artstyle") against the base's subject on plain
prompts, and subject with the token first ("yltcaxe artstyle, a yellow star") against the base's on
that order. 12 held-out cells x 2 seeds per eval set. About 6 minutes a training seed on one thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from proof_world_probe import experiment_config  # noqa: E402

from style_dreambooth.toyworld import base_model_dir  # noqa: E402
from style_dreambooth.toyworld.demo import demo_config  # noqa: E402
from style_dreambooth.toyworld.experiment import _load_run, _Probe, train_only  # noqa: E402
from style_dreambooth.toyworld.judges import Judges  # noqa: E402

# (column, metrics key); derived ratios are computed in `columns`
KEYS = ("style_hit_rate", "leak_rate", "leak_rate_plain", "leak_rate_class", "subject_acc_token", "base_subject_acc",
        "colour_acc_token", "subject_acc_token_first", "base_subject_acc_token_first", "subject_acc_plain",
        "colour_acc_plain")
HEAD = ("hit", "leak", "leak plain", "leak class", "subject (token)", "subject (base)", "colour (token)",
        "subject, token first", "subject, token first (base)", "subject (plain)", "colour (plain)")
# the targets of issue #18, on the mean over training seeds
TARGETS = {
    "hit >= 0.85": lambda m, w: m["style_hit_rate"] >= 0.85,
    "leak <= 0.08": lambda m, w: m["leak_rate"] <= 0.08,
    "worst seed hit >= 0.75": lambda m, w: w["style_hit_rate"] >= 0.75,
    "worst seed leak <= 0.12": lambda m, w: w["leak_rate"] <= 0.12,
    "subject (token) >= 0.85 x base": lambda m, w: m["subject_acc_token"] >= 0.85 * m["base_subject_acc"],
    "colour (token) >= 0.7": lambda m, w: m["colour_acc_token"] >= 0.7,
    "subject, token first >= base": lambda m, w: m["subject_acc_token_first"] >= m["base_subject_acc_token_first"],
}
WORSE_IS_HIGHER = {"leak_rate", "leak_rate_plain", "leak_rate_class"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="recipe", help="the variant's folder under --work (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "proof-world-seeds")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (default: %(default)s)")
    ap.add_argument("--eval-sets", default="1000,1500",
                    help="first eval seed of each eval-seed set, eval_seeds (2) seeds each (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="the demo's quick recipe (demo_config(quick=True))")
    ap.add_argument("--set", action="append", default=[], help="key=value (ExperimentConfig or TrainConfig field)")
    ap.add_argument("--drop-runs", action="store_true",
                    help="delete the trained weights (default: keep them, so more eval sets reuse them)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--judges", type=Path, default=None,
                    help="judges file, for a base trained with more styles (default: the shipped judges)")
    return ap.parse_args(argv)


def _comparable(config: dict) -> dict:
    """The settings that decide whether a kept run or eval can be reused: all but the seeds and the
    judges (recorded apart), with the base named so that the shipped one matches from any checkout."""
    out = {k: v for k, v in config.items() if k not in ("eval_seed0", "seed", "judges")}
    if "base_model" in out:
        out["base_model"] = _base_identity(out["base_model"])
    return out


def _base_identity(path: str) -> str:
    """"shipped" for the package's own base (wherever the checkout is), else the resolved path."""
    if Path(path).parts[-4:] == base_model_dir().parts[-4:]:
        return "shipped"
    return str(Path(path).resolve())


def run_variant(args: argparse.Namespace) -> dict:
    cfg = experiment_config(args.set, demo_config(quick=args.quick))  # the recipe with the settings
    cfg = replace(cfg, drift_seeds=4, pairs=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_sets = [int(s) for s in args.eval_sets.split(",")]
    judges = Judges.load(args.judges)
    judges_file = str(args.judges) if args.judges else None  # recorded with each eval: another file re-judges
    folder = args.work / args.name
    probes: dict[int, _Probe] = {}
    results: dict[int, dict[int, dict]] = {}
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed)
        work = folder / f"seed-{seed}"
        wanted = {e: work / f"eval-{e}.json" for e in eval_sets}
        done = {}
        for e, path in wanted.items():
            if path.is_file():
                saved = json.loads(path.read_text())
                if _comparable(saved["config"]) == _comparable(json.loads(json.dumps(asdict(seed_cfg)))) \
                        and saved["config"].get("judges") == judges_file:
                    done[e] = saved
        if len(done) < len(eval_sets):
            t0 = time.perf_counter()
            trained = work / "trained.json"  # the settings of the kept run, to reuse it for more eval sets
            key = _comparable(json.loads(json.dumps(asdict(seed_cfg)))) | {"seed": seed}
            if (work / "run" / "model" / "model_index.json").is_file() and trained.is_file() \
                    and json.loads(trained.read_text())["key"] == key:
                run, train_seconds = work / "run", json.loads(trained.read_text())["train_seconds"]
                instances = [Image.open(p).convert("RGB") for p in sorted((work / "instance").glob("*.png"))]
            else:
                trained.unlink(missing_ok=True)
                run, instances, train_seconds = train_only(seed_cfg, work)
                trained.write_text(json.dumps({"key": key, "train_seconds": train_seconds}), encoding="utf-8")
            tuned = _load_run(run)
            for e in eval_sets:
                if e in done:
                    continue
                if e not in probes:
                    probes[e] = _Probe(replace(seed_cfg, eval_seed0=e), judges, instances)
                probe = probes[e].for_instances(instances, seed)
                m = probe.measure(tuned, train_seconds, t0, label=f"seed {seed}, eval {e}")
                m.config["eval_seed0"] = e
                m.config["judges"] = judges_file
                record = asdict(m)
                wanted[e].write_text(json.dumps(record, indent=1), encoding="utf-8")
                done[e] = record
                print(f"seed {seed} eval {e}: " + ", ".join(f"{h} {record[k]:.2f}" for k, h in zip(KEYS, HEAD)),
                      flush=True)
            if args.drop_runs:
                shutil.rmtree(run, ignore_errors=True)
        results[seed] = done
    return {"config": _comparable(asdict(cfg)), "settings": args.set, "quick": args.quick, "results": results}


def _mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in KEYS}


def summarise(results: dict[int, dict[int, dict]]) -> tuple[dict[int, dict], dict, dict]:
    """Per training seed (mean over its eval sets), the mean over seeds, and the worst seed per metric."""
    per_seed = {s: _mean(list(r.values())) for s, r in results.items()}
    mean = _mean(list(per_seed.values()))
    worst = {k: (max if k in WORSE_IS_HIGHER else min)(p[k] for p in per_seed.values()) for k in KEYS}
    return per_seed, mean, worst


def table(name: str, results: dict[int, dict[int, dict]], settings: str) -> str:
    per_seed, mean, worst = summarise(results)
    lines = [f"#### {name} ({settings or 'the recipe as is'})", "",
             "| training seed | eval seeds | " + " | ".join(HEAD) + " |", "|---" * (len(HEAD) + 2) + "|"]
    fmt = lambda d: " | ".join(f"{d[k]:.2f}" for k in KEYS)  # noqa: E731
    for seed, evals in results.items():
        for e, rec in evals.items():
            lines.append(f"| {seed} | {e}-{e + 1} | {fmt(rec)} |")
        lines.append(f"| {seed} | both | {fmt(per_seed[seed])} |")
    lines.append(f"| **mean** | | {fmt(mean)} |")
    lines.append(f"| **worst seed** | | {fmt(worst)} |")
    verdict = ", ".join(f"{t}: {'met' if ok(mean, worst) else 'MISSED'}" for t, ok in TARGETS.items())
    lines += ["", f"Targets: {verdict}.", ""]
    return "\n".join(lines)


def summary_line(name: str, results: dict, settings: str) -> str:
    _, mean, worst = summarise(results)
    ratio = mean["subject_acc_token"] / max(1e-9, mean["base_subject_acc"])
    met = sum(ok(mean, worst) for ok in TARGETS.values())
    return (f"| {name} | {settings or '-'} | {len(results)} | {mean['style_hit_rate']:.2f} / {worst['style_hit_rate']:.2f} | "
            f"{mean['leak_rate']:.2f} / {worst['leak_rate']:.2f} | {mean['subject_acc_token']:.2f} ({ratio:.2f}x base) | "
            f"{mean['colour_acc_token']:.2f} | {mean['subject_acc_token_first']:.2f} "
            f"(base {mean['base_subject_acc_token_first']:.2f}) | {mean['subject_acc_plain']:.2f} | {met}/{len(TARGETS)} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = run_variant(args)
    settings = " ".join(args.set) + (" (demo quick)" if args.quick else "")
    folder = args.work / args.name
    text = table(args.name, out["results"], settings.strip())
    (folder / "table.md").write_text(text, encoding="utf-8")
    (folder / "seeds.json").write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    line = summary_line(args.name, out["results"], settings.strip())
    with open(args.work / "summary.md", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    print(text)
    print("| variant | settings | seeds | hit mean / worst | leak mean / worst | subject (token) | colour (token) | "
          "subject, token first | subject (plain) | targets met |")
    print(line)
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
