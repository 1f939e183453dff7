"""The benchmark behind `dptrain bench`: each method is a closure doing one micro-batch step.

Timings interleave the methods round-robin, the order rotated every repeat (so a busy neighbour on
a shared machine slows all of them alike, and no method always runs first or after the heaviest),
on pinned threads (one per process on CPU by default), and report the median with min and max. Peak memory is measured in a separate pass: on CUDA with
`torch.cuda.max_memory_allocated`, on CPU as the rise of the process's peak resident set
(Linux VmHWM, reset through /proc/self/clear_refs) over the resident set before the step, with
glibc told to return large blocks to the system at once so freed tensors do not hide in its cache.
"""
from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from dptrain.dp.engine import DPEngine
from dptrain.dp.head import model_head_loss
from dptrain.dp.reference import naive_clipped_grad_sum
from dptrain.errors import UserError
from dptrain.model import Decoder, DecoderConfig, training_flops_per_token
from dptrain.progress import progress_bar

# User- or document-level clipping: each UNIT_SIZE consecutive rows of the micro-batch are one unit.
UNIT_SIZE = 4
UNIT_METHOD = f"dptrain-unit{UNIT_SIZE}"
OPACUS_NOTE = ("Opacus runs on an untied copy (lm_head gets its own copy of the embedding matrix: "
               "Opacus refuses shared parameters), so its norms omit the tied cross term; its "
               "RMSNorm gains go through Opacus's functorch per-sample path")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of `fn` takes, the device synchronised before and after (CUDA kernels run
    asynchronously: without it the clock would stop before they finish)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_tracking() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD: blocks >= 64 KiB come from (and go back to) mmap
        libc.mallopt(-1, 1 << 16)   # M_TRIM_THRESHOLD
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak bytes a step allocates above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back freed heap pages so reuse shows up
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    step()
    return float(_status_kib("VmHWM") - before) * 1024


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_methods(model: Decoder, inputs, targets, args, device) -> tuple[dict[str, Callable[[], None]], list[str]]:
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = {"nonprivate", "dptrain", UNIT_METHOD, "opacus-hooks", "opacus-ghost", "naive"}
    for m in wanted:
        if m not in known:
            raise UserError(f"unknown method '{m}'; choose from {', '.join(sorted(known))}")
    notes, methods = [], {}
    c = args.max_grad_norm
    amp = lambda: _autocast(device, args.dtype)  # noqa: E731

    if "nonprivate" in wanted:
        def nonprivate():  # the DP step's chunked head and loss, so the two compare fairly
            with amp():
                model_head_loss(model, inputs, targets, reduce=True).backward()
            model.zero_grad(set_to_none=True)
        methods["nonprivate"] = nonprivate

    if "dptrain" in wanted:
        engine = DPEngine(model, c)

        def dptrain_step():
            with amp():
                engine.clipped_grad_sum(inputs, targets)
            engine.zero_grad()
        methods["dptrain"] = dptrain_step

    if UNIT_METHOD in wanted:
        if inputs.shape[0] % UNIT_SIZE:
            raise UserError(f"{UNIT_METHOD} needs --micro-batch a multiple of {UNIT_SIZE}")
        unit_engine = DPEngine(model, c)

        def unit_step():  # the same sequences, clipped as units of UNIT_SIZE sequences each
            with amp():
                unit_engine.clipped_grad_sum(inputs, targets, unit_size=UNIT_SIZE)
            unit_engine.zero_grad()
        methods[UNIT_METHOD] = unit_step

    if "opacus-hooks" in wanted or "opacus-ghost" in wanted:
        import warnings

        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        warnings.filterwarnings("ignore")
        notes.append(OPACUS_NOTE)

        def untied_copy():
            cfg = DecoderConfig(**{**model.cfg.__dict__, "tie_embeddings": False})
            twin = Decoder(cfg).to(device)
            state = model.unique_state_dict()
            state.setdefault("lm_head.weight", model.embed_tokens.weight.detach().clone())
            twin.load_unique_state_dict(state)
            return twin

        batch = inputs.shape[0]
        if "opacus-hooks" in wanted:
            gsm = GradSampleModule(untied_copy(), batch_first=True, loss_reduction="sum")
            opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0,
                              max_grad_norm=c, expected_batch_size=batch, loss_reduction="sum")

            def opacus_hooks():
                with amp():
                    logits = gsm(inputs)
                    losses = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100,
                                             reduction="none")
                    counts = (targets != -100).sum(1).clamp(min=1)
                    (losses.sum(1) / counts).sum().backward()
                opt.pre_step()
                opt.zero_grad(set_to_none=True)
            methods["opacus-hooks"] = opacus_hooks

        if "opacus-ghost" in wanted:
            gsm_g = GradSampleModuleFastGradientClipping(untied_copy(), batch_first=True, loss_reduction="mean",
                                                         max_grad_norm=c, use_ghost_clipping=True)
            opt_g = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm_g.parameters(), lr=0.0),
                                                    noise_multiplier=0.0, max_grad_norm=c,
                                                    expected_batch_size=batch, loss_reduction="mean")
            criterion = DPLossFastGradientClipping(
                gsm_g, opt_g, torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="mean"), "mean")

            def opacus_ghost():
                with amp():
                    logits = gsm_g(inputs)
                    loss = criterion(logits.float().flatten(0, 1), targets.flatten(), shape=logits.shape)
                    loss.backward()
                opt_g.pre_step()
                opt_g.zero_grad(set_to_none=True)
            methods["opacus-ghost"] = opacus_ghost

    if "naive" in wanted:
        def naive():
            with amp():
                _, sums = naive_clipped_grad_sum(model, inputs, targets, c)
            del sums
        methods["naive"] = naive
    return methods, notes


# Dense bf16 peak of the GPUs the project plans for (vendor figures, no sparsity): the MFU denominator.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


@contextlib.contextmanager
def pinned_threads(threads: int | None, device: torch.device):
    """Pin the intra-op threads (torch's and any BLAS pool) for the benchmark, then restore them:
    one per process on CPU by default, so a neighbour on a shared machine or a second process does
    not make timings swing; CUDA keeps torch's default unless asked. Yields the count."""
    if threads is None:
        threads = 1 if device.type == "cpu" else torch.get_num_threads()
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield threads
        else:
            with threadpool_limits(threads):
                yield threads
    finally:
        torch.set_num_threads(before)


def rotated(names: list[str], repeat: int) -> list[str]:
    """The methods in the order of one repeat: shifted by one each repeat, so no method always runs
    first (after a cold cache) or right after the heaviest one."""
    k = repeat % len(names) if names else 0
    return names[k:] + names[:k]


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def peak_flops(device: torch.device, dtype: str, given_tflops: float | None) -> float | None:
    """The device's peak FLOP/s for MFU: given, or the dense bf16 figure of a known GPU; else None."""
    if given_tflops is not None:
        return given_tflops * 1e12
    if device.type != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)


def measure_memory(methods: dict, device: torch.device, notes: list[str]) -> tuple[dict, dict]:
    """Peak bytes above the live set of each method's step, and on CUDA the peak the allocator
    reserved (what the card must hold, fragmentation included)."""
    memory, reserved = {}, {}
    if device.type == "cpu" and not _cpu_peak_tracking():
        notes.append("peak memory unavailable: /proc/self/clear_refs is not writable")
        return memory, reserved
    for name, step in progress_bar(methods.items(), desc="memory", leave=False):
        step()  # once more so lazily created state is already live
        memory[name] = peak_memory(step, device)
        if device.type == "cuda":
            reserved[name] = float(torch.cuda.max_memory_reserved(device))
    return memory, reserved


def run_benchmark(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if args.steps < 1 or args.micro_batch < 1 or args.seq_len < 1:
        raise UserError("--steps, --micro-batch and --seq-len must be positive")
    device = torch.device(args.device)
    with pinned_threads(getattr(args, "threads", None), device) as threads:
        result = measure(args, device, threads)
    print_result(result, args)
    if getattr(args, "json", None):
        _write_json(args.json, result)
    return 0


def measure(args, device: torch.device, threads: int) -> dict:
    """Every figure of the benchmark: times (median and spread), memory, throughput and MFU."""
    cfg = DecoderConfig.from_yaml(args.config)
    if args.seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds the config's max_seq_len {cfg.max_seq_len}")
    torch.manual_seed(args.seed)
    model = Decoder(cfg).to(device)
    g = torch.Generator().manual_seed(args.seed)
    inputs = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len), generator=g).to(device)
    targets = torch.roll(inputs, -1, dims=1)
    targets[:, -1] = -100
    methods, notes = build_methods(model, inputs, targets, args, device)

    for step in progress_bar(methods.values(), desc="warm-up", leave=False):
        step()
    times = {name: [] for name in methods}
    cpu_times = {name: [] for name in methods}
    for repeat in progress_bar(range(args.steps), desc="timing", leave=False):
        for name in rotated(list(methods), repeat):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            methods[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - start_cpu)
    memory, reserved = measure_memory(methods, device, notes)

    tokens = args.micro_batch * args.seq_len
    step_flops = training_flops_per_token(cfg, args.seq_len) * tokens  # the model's work, any method
    peak = peak_flops(device, args.dtype, getattr(args, "peak_tflops", None))
    return {
        "config": args.config, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": threads, "steps": args.steps, "notes": notes,
        "parameters": sum(p.numel() for p in model.parameters()), "flops_per_step": step_flops,
        "peak_flops": peak,
        "seconds_per_step": {name: statistics.median(ts) for name, ts in times.items()},
        "seconds_spread": {name: spread(ts) for name, ts in times.items()},
        "cpu_seconds_per_step": {name: statistics.median(ts) for name, ts in cpu_times.items()},
        "cpu_seconds_spread": {name: spread(ts) for name, ts in cpu_times.items()},
        "tokens_per_second": {name: tokens / statistics.median(ts) for name, ts in times.items()},
        "mfu": {name: step_flops / statistics.median(ts) / peak for name, ts in times.items()} if peak else {},
        "peak_bytes": memory, "reserved_bytes": reserved,
    }


def print_result(r: dict, args) -> None:
    print(f"model {args.config}: {r['parameters'] / 1e6:.1f}M parameters, micro-batch {args.micro_batch} x "
          f"{args.seq_len} tokens, {args.dtype}, {args.device} ({r['threads']} thread{'' if r['threads'] == 1 else 's'}), {args.steps} "
          "steps per method, the methods' order rotated every step")
    for note in r["notes"]:
        print(f"note: {note}")
    print("s/step: wall-clock median (min..max over steps); cpu-s/step: process CPU time, steadier when "
          "other work shares the cores; MFU: the model's training FLOPs per second over the device peak")
    print(f"{'method':14s} {'s/step':>9s} {'min..max':>17s} {'cpu-s/step':>11s} {'tokens/s':>10s} "
          f"{'peak MiB':>9s} {'reserved MiB':>13s} {'MFU':>6s} {'vs non-private':>15s}")
    times, cpu = r["seconds_per_step"], r["cpu_seconds_per_step"]
    base = times.get("nonprivate")
    for name, med in times.items():
        lo, hi = r["seconds_spread"][name]["min"], r["seconds_spread"][name]["max"]
        mem = f"{r['peak_bytes'][name] / 2**20:9.0f}" if name in r["peak_bytes"] else f"{'-':>9s}"
        res = f"{r['reserved_bytes'][name] / 2**20:13.0f}" if name in r["reserved_bytes"] else f"{'-':>13s}"
        mfu = f"{r['mfu'][name]:6.1%}" if name in r["mfu"] else f"{'-':>6s}"
        ratio = f"{med / base:14.2f}x" if base else f"{'-':>15s}"
        print(f"{name:14s} {med:9.3f} {f'{lo:.3f}..{hi:.3f}':>17s} {cpu[name]:11.3f} "
              f"{r['tokens_per_second'][name]:10.0f} {mem} {res} {mfu} {ratio}")
    if "dptrain" not in times:
        return
    dp = times["dptrain"]
    if base:
        print(f"ratio DP/non-private time   {dp / base:.2f} (cpu time {cpu['dptrain'] / cpu['nonprivate']:.2f})")
        memory = r["peak_bytes"]
        if "nonprivate" in memory and "dptrain" in memory and memory["nonprivate"] > 0:
            print(f"ratio DP/non-private memory {memory['dptrain'] / memory['nonprivate']:.2f}")
    if UNIT_METHOD in times:
        print(f"ratio {UNIT_METHOD}/dptrain time {times[UNIT_METHOD] / dp:.2f} "
              f"(cpu time {cpu[UNIT_METHOD] / cpu['dptrain']:.2f}; units of {UNIT_SIZE} sequences against one, "
              "same micro-batch)")
    for other in ("opacus-ghost", "opacus-hooks", "naive"):
        if other in times:
            print(f"ratio {other}/dptrain time {times[other] / dp:.2f} (cpu time {cpu[other] / cpu['dptrain']:.2f})")


def _write_json(path: str, result: dict) -> None:
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(result, indent=1) + "\n")
