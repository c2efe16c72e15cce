#!/usr/bin/env python3
"""CPU use over time of one command, for finding idle cores in a run.

    benches/timeline.py target/release/mergestream merge config.yml out --quiet

Samples the process every 100 ms and prints, per sample, the cores it kept busy (user +
system time over wall time) as a bar, and the bytes it has written so far (/proc/PID/io):
flat bars near the core count mean CPU-bound; low bars with fast-growing writes mean the
disk is the limit; low bars with flat writes mean the run is waiting on itself.
"""
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def written(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    child = subprocess.Popen(sys.argv[1:])
    start = time.time()
    last_t, last_cpu = start, 0.0
    rows = []
    while child.poll() is None:
        time.sleep(0.1)
        cpu, w = cpu_seconds(child.pid), written(child.pid)
        if cpu is None:
            break
        now = time.time()
        rows.append((now - start, (cpu - last_cpu) / (now - last_t), w))
        last_t, last_cpu = now, cpu
    child.wait()
    print(f"wall {time.time() - start:.2f} s, exit {child.returncode}")
    for t, busy, w in rows:
        print(f"{t:6.2f} s {busy:4.2f} {'#' * int(busy * 20):42s} {w / 2**20:8.0f} MiB written")
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
