"""Child program for test_flat_memory: 2,000 one-second segments through generate_batches.

Prints the peak RSS (VmHWM) in KiB before and after the batch as `peak_kib BEFORE AFTER`.
With `hold`, it also keeps every segment, as the leaking web UI did, so the test can show
that its measurement sees growth when there is growth.
"""

import sys
import tempfile

import numpy

import qvshim

SEGMENTS = 2000
SAMPLE_RATE = 24000


def vm_hwm_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def main():
    hold = sys.argv[1:] == ["hold"]
    held = []
    phase = numpy.arange(SAMPLE_RATE, dtype=numpy.float32) * (2 * numpy.pi * 220 / SAMPLE_RATE)

    def generate(batch):
        out = [numpy.sin(phase + len(line)) * 0.5 for line in batch]
        if hold:
            held.extend(out)
        return out, SAMPLE_RATE

    with tempfile.TemporaryDirectory() as out_dir:
        # One batch first, so the baseline holds what a batch needs and the imports' memory.
        qvshim.generate_batches((f"warm {n}" for n in range(50)), generate, out_dir + "/warm", combined=out_dir + "/warm.wav")
        held.clear()
        before = vm_hwm_kib()
        summary = qvshim.generate_batches((f"line {n}" for n in range(SEGMENTS)), generate, out_dir + "/lines",
                                          combined=out_dir + "/all.wav")
        after = vm_hwm_kib()
        assert summary.lines == SEGMENTS and abs(summary.seconds - SEGMENTS) < 1e-6, summary
    print("peak_kib", before, after)


if __name__ == "__main__":
    main()
