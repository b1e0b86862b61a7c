"""`meo-study`: which MoE? Train several variants of one model under one budget and compare them.

Given a prepared corpus (LM or translation; by default the demo corpus, built on the spot), a
model preset and a budget (--steps, or --tokens), every variant (meo_ds/study/variants.py
defines them: dense-1x, dense-2x, topk, xmoe, meo-seq, meo-token) is trained through the real
`deepspeed` launcher and meo_ds.train with the same data order, seed, tokens and schedule
(the demo recipe, meo_ds/demo.py `recipe`, plus --set overrides), evaluated on the validation
split during and at the end of training, and the study directory gets:

    report.md      one table (a row per variant) and a plain reading computed from it
    results.json   every figure: settings, per-variant records and curves, the comparisons
    *.png          validation loss vs step, time and executed FLOPs; expert load heatmaps; XMoE's
                   experts-per-token histogram (meo_ds/study/plots.py)
    configs/, runs/, wall.json   the runs themselves (meo_ds/study/runner.py)

    meo-study                                   # demo corpus, 6 variants x 300 steps: 12 min on 2 busy CPU cores
    meo-study --variants topk,meo-seq --steps 2000 --out studies/a
    meo-study --task mt --data data/wmt/shards --preset mt_tiny --tokens 50000000 --ranks 8
    meo-study --report-only --out studies/a     # rebuild report, results and plots from the runs

Resumable: a finished variant is not trained again; an interrupted one resumes from its latest
checkpoint; running the same command again continues the study. A study directory belongs to
one task, preset, corpus and step budget (study.json): other settings need another --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from meo_ds import demo
from meo_ds.fileio import atomic_write
from meo_ds.study import collect, plots, report, runner
from meo_ds.study.variants import VARIANTS

DEFAULT_STEPS = 300


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meo-study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="meo_study", help="study directory (runs, report, plots)")
    p.add_argument("--task", default="lm", choices=sorted(demo.TASKS), help="language modelling or translation")
    p.add_argument("--data", default=None, help="prepared corpus (meo-prepare's shards directory); default: the demo corpus")
    p.add_argument("--preset", default=None, help="model preset (default tiny for lm, mt_tiny for mt)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help=f"optimizer steps per variant (default {DEFAULT_STEPS})")
    budget.add_argument("--tokens", type=int, default=None, help="training tokens per variant (converted to steps)")
    p.add_argument("--eval-interval", type=int, default=None, help="validate every N steps (default steps/6)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override for every variant (model.* applies to the base model)")
    p.add_argument("--ranks", type=int, default=2, help="ranks (GPUs or CPU processes) per node")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (multi-node), passed to the launcher")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes of the hostfile to use")
    p.add_argument("--report-only", action="store_true", help="train nothing; rebuild report, results and plots")
    p.add_argument("--fresh", action="store_true", help="delete the runs in --out first instead of resuming them")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The problem with the arguments (and its fix), or None."""
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown or not args.variants:
        return f"--variants: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(VARIANTS)}"
    for name in ("steps", "tokens", "eval_interval", "ranks", "num_nodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')}={value} must be >= 1"
    if args.data and not Path(args.data).is_dir():
        return f"--data {args.data}: no such directory; pass the shards directory meo-prepare wrote"
    if args.hostfile and not Path(args.hostfile).is_file():
        return f"--hostfile {args.hostfile}: no such file"
    return None


def settings(args: argparse.Namespace, study: runner.Study, data_dir: Path, steps: int) -> dict:
    return {"task": args.task, "preset": study.preset, "data": str(data_dir), "steps": steps,
            "eval_interval": study.evaluate_every(steps), "world": study.world(),
            "overrides": study.overrides}


def check_settings(out: Path, current: dict) -> Optional[str]:
    """A study directory keeps its task, preset, corpus, steps and overrides (study.json)."""
    path = out / "study.json"
    if not path.is_file():
        atomic_write(path, json.dumps(current, indent=2))
        return None
    earlier = json.loads(path.read_text())
    changed = [k for k in current if earlier.get(k) != current[k]]
    if changed:
        return (f"{out} holds a study with other settings ({', '.join(f'{k}: {earlier.get(k)!r} -> {current[k]!r}' for k in changed)}); "
                f"use another --out, or --fresh to start this one over")
    return None


def build_report(study: runner.Study, current: dict, say=print) -> int:
    wall = runner.read_wall(study.out)
    variants = {}
    for name in study.variants:
        run_dir = study.run_dir(name)
        if not runner.finished(run_dir, current["steps"]):
            say(f"{name}: not finished, left out of the report ({run_dir})")
            continue
        variants[name] = collect.collect(run_dir, wall.get(name), VARIANTS[name].moe)
    if not variants:
        say("no finished variant to report; run meo-study without --report-only first")
        return 1
    files = plots.plot_all(variants, study.out)
    report.write({"settings": current, "variants": variants}, study.out, files)
    say(f"report: {study.out / 'report.md'}; figures: {study.out / 'results.json'}; plots: {', '.join(files)}")
    print((study.out / "report.md").read_text())
    return 0


def report_only(args: argparse.Namespace, out: Path, say=print) -> int:
    """Rebuild report, results and plots from the runs, with the settings the study recorded."""
    path = out / "study.json"
    if not path.is_file():
        print(f"[meo-study] error: {out} holds no study (no study.json); run meo-study --out {out} first", file=sys.stderr)
        return 2
    current = json.loads(path.read_text())
    names = [v for v in args.variants.split(",") if (out / "runs" / v).is_dir()]
    study = runner.Study(out=out, task=current["task"], preset=current["preset"], variants=names, steps=current["steps"])
    return build_report(study, current, say)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    say = lambda text: print(f"[meo-study] {text}", flush=True)  # noqa: E731
    problem = check_args(args)
    if problem:
        print(f"[meo-study] error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if args.report_only:
        return report_only(args, out, say)
    default_preset, demo_dir = demo.TASKS[args.task]["preset"], demo.TASKS[args.task]["data"]
    study = runner.Study(out=out, task=args.task, preset=args.preset or default_preset, variants=args.variants.split(","),
                         steps=args.steps if args.steps or args.tokens else DEFAULT_STEPS, tokens=args.tokens,
                         eval_interval=args.eval_interval, overrides=list(args.set),
                         data=Path(args.data).resolve() if args.data else None, ranks=args.ranks,
                         hostfile=args.hostfile, num_nodes=args.num_nodes)
    if args.fresh and out.exists():
        for name in ("runs", "configs", "wall.json", "study.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if study.data is not None:
        data_dir = study.data
    else:
        from meo_ds.data.demo import build_demo

        say(f"preparing the {args.task} demo corpus in {out / demo_dir}")
        data_dir = Path(build_demo(args.task, out / demo_dir))
    try:
        steps = runner.resolve_steps(study, data_dir)
        current = settings(args, study, data_dir, steps)
        for name in study.variants:  # every variant's config is built (and its model checked) before any training
            runner.run_config(study, name, data_dir, steps)
    except (ValueError, KeyError, OSError) as err:
        print(f"[meo-study] error: {err}", file=sys.stderr)
        return 2
    problem = check_settings(out, current)
    if problem:
        print(f"[meo-study] error: {problem}", file=sys.stderr)
        return 2
    code = runner.run_all(study, data_dir, steps, say)
    return code if code != 0 else build_report(study, current, say)


if __name__ == "__main__":
    sys.exit(main())
