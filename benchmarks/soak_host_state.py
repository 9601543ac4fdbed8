"""Host state over a long run: the main command's RSS and checkpoint size must stay flat
after warm-up, however many episodes finish.

Runs ``experiments/train.py`` (the main command, any extra flags passed after ``--``) as a
child process for ``--minutes``, samples its resident set size every ``--every`` seconds
from ``/proc``, and the size of its newest checkpoint, then reports both at the end of
warm-up (``--warmup_fraction`` of the run) and at the end, with the episodes finished
(from ``metrics.jsonl``). A run whose host state grows with the episode count shows RSS and
checkpoint size climbing with it.

    python benchmarks/soak_host_state.py --minutes=12 --out=runs/soak
    python benchmarks/soak_host_state.py --minutes=2 -- --model=tiny --trainable=full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_gib(pid: int) -> float:
    """Resident set size of process ``pid`` and its children (GiB), from /proc."""
    total_kib = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 2**20


def newest_checkpoint_mib(workdir: str) -> float | None:
    """Size (MiB) of the newest complete checkpoint under ``workdir/checkpoints``."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True)
    for step in steps:
        path = os.path.join(root, str(step))
        size = 0
        for dirpath, _, files in os.walk(path):
            size += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        if size:
            return size / 2**20
    return None


def episodes_finished(workdir: str) -> int | None:
    """The episode counter of the newest record in ``metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            if line.strip():
                last = json.loads(line)
    return None if last is None else int(last.get("episodes", -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup_fraction", type=float, default=0.25)
    parser.add_argument("--out", default="runs/soak")
    parser.add_argument("train_flags", nargs="*", help="flags for experiments/train.py")
    args = parser.parse_args()
    workdir = os.path.join(args.out, "run")
    os.makedirs(args.out, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [
        sys.executable, os.path.join(here, "..", "experiments", "train.py"),
        "--total_steps=100000000", f"--workdir={workdir}", "--progress=false",
        "--eval_every=0", *args.train_flags,
    ]  # fmt: skip
    child = subprocess.Popen(cmd)
    start = time.time()
    samples = []
    try:
        while time.time() - start < 60 * args.minutes and child.poll() is None:
            time.sleep(args.every)
            samples.append(
                {
                    "seconds": round(time.time() - start, 1),
                    "rss_gib": round(rss_gib(child.pid), 4),
                    "checkpoint_mib": newest_checkpoint_mib(workdir),
                    "episodes": episodes_finished(workdir),
                }
            )
    finally:
        if child.poll() is None:
            child.terminate()
            child.wait(timeout=60)
    if child.returncode not in (0, -15, None):
        sys.exit(f"error: the run exited with {child.returncode}")
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump({"command": cmd, "samples": samples}, f, indent=1)
    timed = [s for s in samples if s["episodes"] is not None]
    if len(timed) < 2:
        sys.exit("error: too few samples after the first update; run longer")
    warm = next(s for s in timed if s["seconds"] >= args.warmup_fraction * timed[-1]["seconds"])
    end = timed[-1]
    print(f"{'':>10} {'seconds':>8} {'episodes':>10} {'RSS GiB':>8} {'ckpt MiB':>9}")
    for label, s in (("warm-up", warm), ("end", end)):
        ckpt = s["checkpoint_mib"]
        ckpt_text = f"{ckpt:9.2f}" if ckpt is not None else f"{'-':>9}"
        print(
            f"{label:>10} {s['seconds']:8.0f} {s['episodes']:10d} {s['rss_gib']:8.3f} {ckpt_text}"
        )
    peak = max(s["rss_gib"] for s in timed if s["seconds"] >= warm["seconds"])
    print(
        f"RSS after warm-up: peak {peak:.3f} GiB, end - warm-up {end['rss_gib'] - warm['rss_gib']:+.3f} GiB"
    )


if __name__ == "__main__":
    main()
