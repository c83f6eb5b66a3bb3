"""Speed and tightness of spectral-norm bounds on real convolution layers.

Layers: every convolution of torchvision's ResNet-18 (random init, seeded) and the three
convolutions of the library's demo ``SmallCNN``, trained here on scikit-learn's digits. For
each layer and method: the value and the median wall time over several repeats
(``time.perf_counter``, one process, a fixed number of threads). The methods, each with its
paper, are in :mod:`.methods`; ``P`` = provable upper bound, ``E`` = exact, ``L`` = estimate
from below.

Four tables:

1. *Paper table sizes*: every ResNet-18 convolution as the circular stride-1 operator at input
   size n = 224/112/56/28 for 64/128/256/512 output channels, the sizes of the paper's table
   (its notebook computed every layer's "exact" norm with the FFT method, which is exact for
   this operator only). The provable bounds are computed WITHOUT the input size (valid for
   every size). The FFT norm is computed on the n/4 grid (a subset of the n grid's
   frequencies, so a lower bound of the exact norm at n) and its time is EXTRAPOLATED to the
   n grid by the ratio of frequency counts (one small SVD per frequency); one layer is also
   run on the n/2 grid to check the extrapolation.
2. *Real input sizes*: every ResNet-18 convolution as it is (zero padding, stride) at the input
   size it sees for a 224x224 image. The real operator's norm is bracketed by ``op-PI``
   (below) and every provable bound (above).
3. *Trained digits CNN*: the same, with the explicit operator matrix as the exact reference.
4. One batched power-iteration step over all ResNet-18 convolutions (grouped by equal shape,
   stacked), timed against one read of all their weights: its cost in passes over memory.

Layers of equal shape, stride and input size (random init: the same distribution) are
measured once and counted once per layer they stand for, marked ``(+k)`` in the tables.

Run ``python -m benchmarks.boundspeed`` from the
repository root (about five minutes on a 2-core CPU), or add ``--quick`` (reduced sizes, some
seconds; run by ``tests/demos/test_benchmarks.py``). Results go to ``benchmarks/results/``. The
default of one thread is deliberate: on a shared, oversubscribed machine LAPACK with two
threads ran 5-100x slower than with one.
"""
