"""transformers' own model tests, unpatched and patched: every test must end the same way in both runs.

    .venv/bin/python tools/hf_model_tests.py [--out DIR] [--jobs 1|2] [FAMILY ...]

The test files are vendored from transformers under transformers_tests/ (its README says which release and
commit). Each selected file runs twice under pytest with a junit XML report: unpatched, and with
FASTFLAMINGO_PATCH=1, where transformers_tests/conftest.py hands every model the tests build to fastflamingo.patch
at the end of its construction. The run fails unless

  - every test has the same outcome (passed / failed / skipped) both ways,
  - the patched run really patched: in every file, at least one test built a model that fastflamingo patched
    (counted from the junit property the conftest records per test), and
  - pytest itself ran (no collection error, no crash).

Tests that fail both ways (version skew between the vendored files and the installed transformers, a checkpoint on
the Hub, an optional dependency) are listed with their first error line, never hidden; tests that need a GPU, the
Hub (``@slow``) or an optional package skip in both runs alike. A short list of deselected tests follows, each with
the reason it tells us nothing about fastflamingo's modules.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "transformers_tests"

# family -> the vendored test file of its models
FILES = {
    "evolla": "tests/models/evolla/test_modeling_evolla.py",
    "idefics2": "tests/models/idefics2/test_modeling_idefics2.py",
    "mllama": "tests/models/mllama/test_modeling_mllama.py",
    "idefics": "tests/models/idefics/test_modeling_idefics.py",
}
DEFAULT = tuple(FILES)  # all four: about 4-5 min of CPU per run on the CI machine (transformers_tests/README.md)

# node id (relative to transformers_tests/) -> why running it in both modes tells nothing about fastflamingo
DESELECT = {
    "tests/models/mllama/test_modeling_mllama.py::MllamaForCausalLMModelTest":
        "its text-only config has no cross-attention layers, so no model it builds holds a module fastflamingo "
        "replaces (a patched run patched none of its 232 tests' models): both runs execute the same code; it was "
        "a third of the file's time, most of it torch.compile",
}

PROPERTY = "fastflamingo_patched"


def pytest_command(python: str, files, junit: Path):
    command = [python, "-m", "pytest", *files, f"--junitxml={junit}", "-q", "-p", "no:cacheprovider",
               "-o", "junit_logging=no", "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning"]
    for node in DESELECT:
        if node.split("::")[0] in files:
            command.append(f"--deselect={node}")
    return command


def run_both(python: str, files, out: Path, jobs: int):
    """Start the unpatched and the patched run (side by side with jobs=2); returns {mode: (rc, seconds)}."""
    procs, started, results = {}, {}, {}
    for mode in ("unpatched", "patched"):
        env = dict(os.environ, FASTFLAMINGO_PATCH="1" if mode == "patched" else "0")
        if jobs > 1:  # two pytest processes on two cores: one thread each, or the OpenMP pools spin against each other
            env.setdefault("OMP_NUM_THREADS", "1")
        log = open(out / f"{mode}.log", "w")
        started[mode] = time.monotonic()
        procs[mode] = (subprocess.Popen(pytest_command(python, files, out / f"{mode}.xml"), cwd=TREE, env=env,
                                        stdout=log, stderr=subprocess.STDOUT), log)
        if jobs == 1:
            results[mode] = (procs[mode][0].wait(), time.monotonic() - started[mode])
            log.close()
    for mode, (proc, log) in procs.items():
        if mode not in results:
            results[mode] = (proc.wait(), time.monotonic() - started[mode])
            log.close()
    return results


def outcomes(junit: Path):
    """{file: {test: (outcome, first line of the failure or skip reason, patched-models property)}}; a test that
    reports several cases (subtests) failed if any failed, and passed if any passed."""
    rank = {"failed": 3, "passed": 2, "skipped": 1}
    found: dict = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "")
        parts = module.split(".")
        cls = parts[-1]
        path = "/".join(parts[:-1]) + ".py"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "").splitlines()[0:1]
            elif child.tag == "skipped" and outcome != "failed":
                outcome, message = "skipped", (child.get("message") or "").splitlines()[0:1]
        message = message[0][:160] if message else ""
        props = {p.get("name"): p.get("value") or "" for p in case.iter("property")}
        name = f"{cls}::{case.get('name')}"
        before = found.setdefault(path, {}).get(name)
        if before is None or rank[outcome] > rank[before[0]]:
            found[path][name] = (outcome, message, props.get(PROPERTY, "") or (before[2] if before else ""))
    return found


def compare(files, out: Path, results) -> bool:
    runs = {mode: outcomes(out / f"{mode}.xml") for mode in ("unpatched", "patched")}
    ok = True
    for mode, (rc, seconds) in results.items():
        print(f"{mode}: pytest exit {rc} in {seconds:.0f} s ({out / f'{mode}.log'})")
        if rc not in (0, 1):  # 1: some tests failed (compared below); anything else: pytest could not run them
            print(f"  FAIL: pytest exited {rc}: collection error, interruption or crash")
            ok = False
    for path in files:
        unpatched, patched = runs["unpatched"].get(path, {}), runs["patched"].get(path, {})
        count = {mode: Counter(o for o, _, _ in runs[mode].get(path, {}).values()) for mode in runs}
        built = [name for name, (_, _, prop) in patched.items() if prop.strip()]
        models = Counter(item.split(":")[0] for _, _, prop in patched.values() for item in prop.split())
        print(f"\n{path}")
        for mode in runs:
            print(f"  {mode:<9} " + ", ".join(f"{count[mode][o]} {o}" for o in ("passed", "failed", "skipped")))
        print(f"  patched run: {len(built)} tests built a patched model ({sum(models.values())} models: "
              + ", ".join(f"{n} {name}" for name, n in sorted(models.items())) + ")")
        unpatched_code = [name for name, (o, _, prop) in patched.items() if o != "skipped" and not prop.strip()]
        print(f"  {len(unpatched_code)} tests ran without building a model fastflamingo patches (the same code "
              "both ways)")
        differ = sorted((name, unpatched.get(name, ("missing",))[0], patched.get(name, ("missing",))[0])
                        for name in set(unpatched) | set(patched)
                        if unpatched.get(name, ("missing",))[0] != patched.get(name, ("missing",))[0])
        if differ:
            ok = False
            print(f"  FAIL: {len(differ)} tests differ (unpatched -> patched):")
            for name, before, after in differ:
                reason = patched.get(name, ("", "", ""))[1] or unpatched.get(name, ("", "", ""))[1]
                print(f"    {name}: {before} -> {after}  {reason}")
        if not built:
            ok = False
            print("  FAIL: no test built a model that fastflamingo patched (family not registered yet?)")
        failed_both = sorted(name for name, (o, _, _) in unpatched.items()
                             if o == "failed" and patched.get(name, ("",))[0] == "failed")
        if failed_both:
            print(f"  failing both ways ({len(failed_both)}; not fastflamingo's, see transformers_tests/README.md):")
            for name in failed_both:
                print(f"    {name}: {unpatched[name][1]}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(DEFAULT),
                        help=f"test files to run, by family: {', '.join(FILES)} (default: {' '.join(DEFAULT)})")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "hf_model_tests",
                        help="folder for the junit XML reports and logs")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="2: the unpatched and patched runs side by side (one thread each)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    parser.add_argument("--compare-only", action="store_true",
                        help="compare the reports already in --out instead of running the tests")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in FILES]
    if unknown:
        parser.error(f"unknown families {unknown}; expected some of {', '.join(FILES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    files = [FILES[f] for f in args.families]
    for node, why in DESELECT.items():
        if node.split("::")[0] in files:
            print(f"deselected {node}: {why}")
    start = time.monotonic()
    if args.compare_only:
        results = {mode: (1, 0.0) for mode in ("unpatched", "patched")}
    else:
        results = run_both(args.python, files, args.out.resolve(), args.jobs)
    ok = compare(files, args.out, results)
    print(f"\n{'passed' if ok else 'FAILED'}: {' '.join(args.families)} in {time.monotonic() - start:.0f} s wall")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
