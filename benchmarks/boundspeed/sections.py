"""The markdown sections of the report, in order: header, tables 1-4, soundness verdict."""

from __future__ import annotations

from benchmarks.boundspeed.config import PAPER_SIZES, Config, Layer
from benchmarks.boundspeed.report import fmt_time, load, machine, summary, time_table, value_table
from benchmarks.boundspeed.tables import DIGIT_METHODS, PAPER_METHODS, REAL_METHODS, FftCheck


def header(cfg: Config) -> list[str]:
    """Title, the machine (CPU, cores, torch, Python, device, threads, load), the legend."""
    title = "# Spectral-norm bounds: speed and tightness"
    return [
        title + (" (--quick smoke run, reduced sizes)" if cfg.quick else ""),
        "",
        f"Machine: {machine()}; device {cfg.device}; torch.set_num_threads({cfg.threads}); "
        f"{load()} at start.",
        "",
        "Values are spectral norms: FF, Gram-FF and tightest are provable upper bounds, FFT and "
        "matrix exact norms, FF-PI and op-PI estimates from below. Times are medians over the "
        "number of timed repeats in parentheses (after one warm-up call when it is cheap). "
        "`(+k)`: this layer stands for k more layers of equal shape, stride and input size "
        "(random init: same distribution); totals and means count it k+1 times. "
        "Method definitions: `benchmarks/boundspeed/methods.py`, `docs/benchmarks.md`.",
        "",
    ]


def _paper_sizes(cfg: Config) -> str:
    channels = sorted(cfg.paper_sizes)
    sizes = "/".join(str(cfg.paper_sizes[c]) for c in channels)
    text = f"{sizes} for {'/'.join(map(str, channels))} output channels"
    if cfg.paper_sizes == PAPER_SIZES:
        return text + ", as in the paper"
    paper_sizes = "/".join(str(PAPER_SIZES[c]) for c in sorted(PAPER_SIZES))
    paper_channels = "/".join(map(str, sorted(PAPER_SIZES)))
    return f"{text}; the paper's table has {paper_sizes} for {paper_channels}"


def _check_note(c: FftCheck) -> str:
    return (
        f"Extrapolation check on {c.layer}: FFT on the n/2 = {c.n // 2} grid took "
        f"{fmt_time(c.half.seconds)}, extrapolated from the n/{c.subsample} grid: "
        f"{fmt_time(c.predicted)}; value {c.half.value:.4f} on the n/2 grid vs "
        f"{c.subgrid_value:.4f} on the n/{c.subsample} grid."
    )


def paper(rows: list[Layer], checks: list[FftCheck], cfg: Config) -> list[str]:
    """Table 1: circular stride-1 stand-ins at the paper's sizes, FFT time extrapolated."""
    s = cfg.fft_subsample
    return [
        "## 1. ResNet-18 at the paper's table sizes (circular stride-1 operators)",
        "",
        f"Each filter as the circular, stride-1 convolution at input size n ({_paper_sizes(cfg)})."
        " The bounds are computed without n (valid at every size). FFT: the exact norm of this "
        f"operator on the n/{s} grid, whose frequencies are a subset of the n grid's, so it is a "
        f"lower bound of the exact norm at n; its time is EXTRAPOLATED to the n grid (x {s}^2, "
        "the number of frequencies; one small SVD each).",
        "",
        *value_table(rows, PAPER_METHODS, "FFT"),
        "",
        *summary(rows, "FFT"),
        "",
        "Time per layer (timed repeats); FFT extrapolated to n as above:",
        "",
        *time_table(rows, PAPER_METHODS),
        "",
        *map(_check_note, checks),
        "",
    ]


def real(rows: list[Layer], cfg: Config) -> list[str]:
    """Table 2: the real ResNet-18 layers, bracketed by op-PI from below."""
    stopped = [layer.name for layer in rows if "op-PI stopped at max_iter" in layer.notes]
    return [
        f"## 2. ResNet-18 layers as they are, at their input sizes for a {cfg.image_size}x"
        f"{cfg.image_size} image",
        "",
        "Zero padding and the layer's stride; `tightest` uses the input size. op-PI: block "
        f"power iteration on the operator (rtol {cfg.op_pi_tol:g}, at most "
        f"{cfg.op_pi_max_iter} steps), a lower bound of the real norm, so bound/op-PI "
        "over-states the true ratio. FFT: the circular stride-1 stand-in at the same size, "
        "exact for that other operator, for reference (a strided layer's norm can be far "
        "below it)." + (f" op-PI stopped at max_iter on: {', '.join(stopped)}." if stopped else ""),
        "",
        *_tables(rows, REAL_METHODS, "op-PI"),
    ]


def digits(rows: list[Layer], acc: float, cfg: Config) -> list[str]:
    """Table 3: the trained digits CNN, the explicit matrix's norm as the exact reference."""
    return [
        f"## 3. SmallCNN trained on the digits ({cfg.digits_epochs} epochs of SGD, test "
        f"accuracy {acc:.3f})",
        "",
        "The real layers (zero padding, strides 1/2/2) at their input sizes; `matrix` is the "
        "exact norm of the explicit operator matrix.",
        "",
        *_tables(rows, DIGIT_METHODS, "matrix"),
    ]


def _tables(rows: list[Layer], methods: list[str], exact: str) -> list[str]:
    return [
        *value_table(rows, methods, exact),
        "",
        *summary(rows, exact),
        "",
        "Time per layer (timed repeats):",
        "",
        *time_table(rows, methods),
        "",
    ]


def batched(step: dict[str, float]) -> list[str]:
    """Table 4: a batched power-iteration step in passes over the weights' memory."""
    read = step["read"]
    return [
        "## 4. One batched power-iteration step over all ResNet-18 convolutions",
        "",
        f"All {step['layers']} layers, in {step['shapes']} stacks of equal shape, "
        f"{step['megabytes']:.1f} MiB of float32 weights; every matricization of every layer. "
        f"Medians of {step['rounds']} interleaved rounds.",
        "",
        "| operation | median time | passes over the weights' memory |",
        "|---|---|---|",
        f"| read every weight once (sum per tensor) | {fmt_time(read)} | 1.00 |",
        f"| power iteration step, weights pre-stacked | {fmt_time(step['step'])} | "
        f"{step['step'] / read:.2f} |",
        f"| power iteration step, stacking included | {fmt_time(step['step_stack'])} | "
        f"{step['step_stack'] / read:.2f} |",
        "",
    ]


def soundness(problems: list[str], seconds: float) -> list[str]:
    """The verdict: every provable bound >= every exact value and estimate from below."""
    verdict = "yes" if not problems else "NO:\n" + "\n".join(f"- {p}" for p in problems)
    return [
        "## Soundness",
        "",
        "Every provable bound >= every exact value and estimate from below of its operator: "
        + verdict,
        "",
        f"Total benchmark time: {seconds:.0f} s; {load()} at the end.",
        "",
    ]
