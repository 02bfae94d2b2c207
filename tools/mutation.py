"""Mutation testing of urepa's modules, each against its own test file (issue 11). Local only: it is slow.

    pip install mutmut==3.8.1
    python tools/mutation.py                 # every module with a test file (urepa/<module>.py: tests/test_<module>.py)
    python tools/mutation.py losses sample   # some of them
    python tools/mutation.py train --only 'urepa.train.xǁTrainerǁstep__mutmut_*'   # one function's mutants
    python tools/mutation.py train --tests tests/test_train.py --max-children 8   # the slow tests too
    python tools/mutation.py train --sample 150 --seed 0   # an unbiased estimate where a full run takes too long

Each module is mutated by mutmut in its own scratch copy of the tracked files (under .mutation/<module>/,
so the runs neither touch the working tree nor share mutmut's state), against that module's test file,
tests/test_<module>.py, less the tests marked slow (`-m "not slow"`: the minutes-long training runs and the
runs on several processes): mutmut then runs, for each mutant, only the selected tests that reach the mutated
function. `--tests` replaces the test file, and then the slow tests run too. Prints killed / total per module
and the surviving mutants; `mutmut show <name>` inside the scratch copy shows one. mutmut 3 does not mutate
decorated functions (`@torch.no_grad()`, `@contextmanager`, `@property`): those are outside the score.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / ".mutation"

PACKAGE = REPO / "urepa"
TESTS = REPO / "tests"
FAST = ["-m", "not slow"]  # the minutes-long tests (pytest marker `slow`, pyproject.toml) stay out of a mutant's run


def module_tests() -> dict[str, str]:
    """module -> its test file: every urepa/<module>.py that has a tests/test_<module>.py, in name order."""
    return {path.stem: f"tests/test_{path.stem}.py" for path in sorted(PACKAGE.glob("*.py"))
            if (TESTS / f"test_{path.stem}.py").is_file()}


def sampled_mutants(scratch: Path, module: str, env: dict, only: list[str], size: int, seed: int) -> list[str]:
    """`size` mutants drawn at random (seeded) from the module's mutants that match `only` (all if empty)."""
    subprocess.run([sys.executable, "-c", "from mutmut.__main__ import create_mutants; create_mutants(1)"],
                   cwd=scratch, env=env, check=True, stdout=subprocess.DEVNULL)
    meta = json.loads((scratch / "mutants" / "urepa" / f"{module}.py.meta").read_text())
    names = sorted(name for name in meta["exit_code_by_key"]
                   if not only or any(fnmatch.fnmatch(name, pattern) for pattern in only))
    return random.Random(seed).sample(names, min(size, len(names)))


def run_module(module: str, max_children: int, only: list[str], tests: list[str], sample: int | None,
               seed: int) -> dict[str, list[str]]:
    scratch = SCRATCH / module
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, scratch / name)
    lines = ["[mutmut]", "source_paths = urepa/", f"only_mutate = urepa/{module}.py",
             "also_copy =", "    config/", "    workflow/", "    Snakefile",
             "pytest_add_cli_args_test_selection ="] + [f"    {test}" for test in tests or [module_tests()[module]]] + [
             "pytest_add_cli_args ="] + [f"    {arg}" for arg in ["-p", "no:cacheprovider", *([] if tests else FAST)]] + [
             "process_isolation = forkserver", "use_git_change_detection = false"]
    (scratch / "setup.cfg").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    if sample is not None:
        only = sampled_mutants(scratch, module, env, only, sample, seed)
    subprocess.run(["nice", sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *only],
                   cwd=scratch, env=env, check=True)
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=scratch, env=env,
                             capture_output=True, text=True, check=True).stdout
    by_status: dict[str, list[str]] = collections.defaultdict(list)
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            by_status[status].append(name)
    return by_status


def main() -> None:
    modules = module_tests()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(modules)}")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--tests", nargs="+", default=[], metavar="PYTEST_ARG",
                        help="the tests to run instead of the module's test file less its slow tests (e.g. "
                             "tests/test_train.py for train.py's slow tests too: minutes per mutant)")
    parser.add_argument("--only", nargs="+", default=[], metavar="GLOB",
                        help="test only the mutants whose names match (mutmut's fnmatch patterns)")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="test N mutants drawn at random from those selected (a score estimate for a module "
                             "whose full run takes too long); the rest are reported as not tested")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample's draw (default 0)")
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(modules))
    if unknown:
        parser.error(f"unknown module(s) {unknown}; expected some of {list(modules)} (urepa modules with a "
                     f"tests/test_<module>.py)")
    for module in args.modules or modules:
        by_status = run_module(module, args.max_children, args.only, args.tests, args.sample, args.seed)
        unchecked = len(by_status.pop("not checked", []))  # left out by --only
        total = sum(len(names) for names in by_status.values())
        print(f"urepa/{module}.py: {len(by_status.get('killed', []))} killed of {total} tested "
              f"({', '.join(f'{len(v)} {k}' for k, v in sorted(by_status.items()))}; {unchecked} not tested)")
        for status, names in sorted(by_status.items()):
            if status != "killed":
                for name in names:
                    print(f"    {status}: {name}")


if __name__ == "__main__":
    main()
