"""The long fuzz run: thousands of mutated inputs through simcc's CLI, each in a sandboxed
subprocess (wall-clock timeout, address-space limit), classified against simcc's promise (exit 0
with strict finite JSON, or exit 2 with one `error: ` line; never a traceback, hang or runaway).

    python benchmarks/fuzz.py --cases 3000 --jobs 2 --seed 1 --out fuzz-out

Prints counts per outcome and per kind of input, and the distinct root causes (exception type
and innermost simcc function); writes every failing case under OUT/failures/OUTCOME/ID (its
files, command.sh, stderr), OUT/outcomes.jsonl and OUT/report.md. Case i of seed s is always
the same case, so `--only 17,204` replays two cases of a run. By default the simcc tree is copied
to OUT/snapshot first, so that edits made to the repository during a long run do not mix into it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzz_support as F  # noqa: E402

TREE = ("simcc", "workloads", "hardware_profiles")


def prepare_source(mode: str, out: Path) -> Path:
    """The simcc tree under test: the live repository, a copy of it, or the committed HEAD."""
    if mode == "live":
        return F.ROOT
    target = out / "snapshot"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    if mode == "head":
        archive = subprocess.run(["git", "-C", str(F.ROOT), "archive", "HEAD", *TREE], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    else:
        for name in TREE:
            shutil.copytree(F.ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def describe_source(mode: str) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(F.ROOT), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if mode == "head":
        return f"HEAD {head}"
    changed = git("status", "--short", "--", "simcc")
    files = len(changed.splitlines())
    return f"working tree at {time.strftime('%Y-%m-%d %H:%M:%S')} (HEAD {head} + {files} changed files under simcc/)"


def size_of(case: F.Case) -> int:
    return sum(len(c) for c in case.files.values()) + len(" ".join(case.argv))


def report(outcomes: list[F.Outcome], cases: dict[str, F.Case], args: argparse.Namespace, source: str,
           elapsed: float, out: Path) -> str:
    """Markdown: counts per outcome and kind, then one section per distinct root cause."""
    lines = [f"# simcc fuzz report", "",
             f"- source: {source}",
             f"- cases: {len(outcomes)} (seed {args.seed}, {args.jobs} jobs, timeout {args.timeout:g} s, "
             f"RLIMIT_AS {args.memory_gb:g} GiB), wall {elapsed / 60:.1f} min",
             f"- replay one case: `python benchmarks/fuzz.py --seed {args.seed} --only INDEX --out DIR` or "
             f"`bash {out}/failures/OUTCOME/ID/command.sh`", ""]
    counts = Counter(o.outcome for o in outcomes)
    lines += ["## Outcomes", "", "| outcome | cases |", "|---|---|"]
    lines += [f"| {name} | {counts.get(name, 0)} |" for name in F.OUTCOMES]
    kinds = sorted({o.kind for o in outcomes})
    lines += ["", "## Per kind of input", "", "| kind | " + " | ".join(F.OUTCOMES) + " |",
              "|---|" + "---|" * len(F.OUTCOMES)]
    for kind in kinds:
        row = Counter(o.outcome for o in outcomes if o.kind == kind)
        lines.append(f"| {kind} | " + " | ".join(str(row.get(n, 0)) for n in F.OUTCOMES) + " |")
    warned = [o for o in outcomes if o.warnings and o.passed]
    if warned:
        lines += ["", f"{len(warned)} passing cases printed numpy RuntimeWarnings (overflow / invalid value) on "
                      f"stderr, e.g. `{warned[0].command}` ({warned[0].mutation})."]
    slow = sorted((o for o in outcomes if o.passed), key=lambda o: -o.seconds)[:5]
    if slow:
        lines += ["", "Slowest passing cases: " + "; ".join(f"{o.ident} {o.seconds:.1f} s ({o.kind}: {o.mutation[:60]})"
                                                          for o in slow)]
    groups: dict[str, list[F.Outcome]] = defaultdict(list)
    for outcome in outcomes:
        if not outcome.passed:
            groups[f"{outcome.outcome}: {outcome.root}"].append(outcome)
    lines += ["", f"## Distinct root causes ({len(groups)})", ""]
    for number, (key, members) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1])), start=1):
        smallest = min(members, key=lambda o: (size_of(cases[o.ident]), o.seconds))
        case = cases[smallest.ident]
        kinds_hit = Counter(o.kind for o in members)
        lines += [f"### {number}. {key}", "",
                  f"- cases: {len(members)} ({', '.join(f'{k} {n}' for k, n in kinds_hit.most_common())})",
                  f"- example {smallest.ident}: {case.kind} `{case.base}`: {case.mutation}",
                  f"- detail: `{smallest.detail[:300]}`",
                  f"- reproduce: `bash {out}/failures/{smallest.outcome}/{smallest.ident}/command.sh`",
                  f"  (`{case.shell()}` in that folder)",
                  "- other mutations: " + "; ".join(sorted({m.mutation[:70] for m in members if m is not smallest})[:6]),
                  ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("fuzz-out"))
    parser.add_argument("--timeout", type=float, default=F.DEFAULT_TIMEOUT_S, help="seconds per case")
    parser.add_argument("--memory-gb", type=float, default=F.DEFAULT_MEMORY_BYTES / (1 << 30), help="RLIMIT_AS per case")
    parser.add_argument("--source", choices=["snapshot", "head", "live"], default="snapshot",
                        help="snapshot: a copy of the working tree (default); head: the committed tree; live: the repository")
    parser.add_argument("--kinds", default="", help=f"comma-separated subset of {','.join(F.KINDS)}")
    parser.add_argument("--only", default="", help="comma-separated case indexes to replay")
    parser.add_argument("--no-baseline", action="store_true", help="skip running every input unmutated first")
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed --set cases and the regression cases (one per root cause found)")
    args = parser.parse_args()

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    source_root = prepare_source(args.source, out)
    source = describe_source(args.source)
    corpus = F.Corpus(source_root)
    kinds = [k for k in args.kinds.split(",") if k] or None
    if kinds and set(kinds) - set(F.KINDS):
        parser.error(f"unknown kinds {set(kinds) - set(F.KINDS)}")

    cases: list[F.Case] = []
    if not args.no_baseline and not args.only:
        cases += F.baseline_cases(corpus)
    if not args.no_fixed and not args.only:
        cases += F.fixed_override_cases() + F.regression_cases()
    indexes = [int(i) for i in args.only.split(",") if i] if args.only else range(args.cases)
    for index in indexes:
        kind = kinds[index % len(kinds)] if kinds else None
        cases.append(F.generate(corpus, args.seed, index, kind=kind))
    by_id = {c.ident: c for c in cases}

    lock = threading.Lock()
    done = Counter()
    started = time.monotonic()
    failures = out / "failures"
    if failures.exists() and not args.only:
        shutil.rmtree(failures)
    log = (out / "outcomes.jsonl").open("a" if args.only else "w")

    def progress(outcome: F.Outcome) -> None:
        with lock:
            done[outcome.outcome] += 1
            log.write(json.dumps({k: v for k, v in outcome.as_dict().items() if k != "stdout_head"}) + "\n")
            log.flush()
            if not outcome.passed:
                F.save_failure(by_id[outcome.ident], outcome, failures, source_root)
                print(f"  {outcome.ident} {outcome.kind:13s} {outcome.outcome:14s} {outcome.root[:90]}  "
                      f"[{outcome.mutation[:60]}]", flush=True)
            total = sum(done.values())
            if total % 100 == 0 or total == len(cases):
                rate = total / (time.monotonic() - started)
                print(f"{total}/{len(cases)} cases, {rate:.2f}/s: " + ", ".join(f"{k} {v}" for k, v in done.most_common()),
                      flush=True)

    print(f"fuzzing {source} with {len(cases)} cases, {args.jobs} jobs -> {out}", flush=True)
    outcomes = F.run_many(cases, args.jobs, source_root, sys.executable, args.timeout,
                          int(args.memory_gb * (1 << 30)), progress)
    log.close()
    elapsed = time.monotonic() - started
    text = report(outcomes, by_id, args, source, elapsed, out)
    (out / "report.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({
        "source": source, "seed": args.seed, "cases": len(outcomes), "seconds": round(elapsed, 1),
        "outcomes": Counter(o.outcome for o in outcomes),
        "per_kind": {k: Counter(o.outcome for o in outcomes if o.kind == k) for k in sorted({o.kind for o in outcomes})},
        "roots": Counter(f"{o.outcome}: {o.root}" for o in outcomes if not o.passed),
    }, indent=2))
    print(text)
    sys.exit(0 if all(o.passed for o in outcomes) else 1)


if __name__ == "__main__":
    main()
