"""Shared helpers of the benchmarks: machine facts, timing, the demo trainer, RESULTS.md sections, memory.

Every benchmark measures both sides of its ratio in the same process run (or in fresh child processes
started by the same run), on the same machine, and reports the median of several repetitions after warm-up.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "RESULTS.md"
DEMO = ROOT / "configs" / "demo.yaml"

logging.basicConfig(level=logging.WARNING)
for _name in ("safe_av", "accelerate", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def setup_threads() -> int:
    """All cores this process may use (the machine allows no more)."""
    n = cores()
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import transformers

    return {"cpu": cpu_model(), "cores": cores(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def median(xs) -> float:
    return float(statistics.median(xs))


def timed(fn, *, warmup: int, reps: int) -> list[float]:
    """Wall times (s) of ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(fns: dict, *, warmup: int, reps: int, cpu: dict | None = None) -> dict[str, list[float]]:
    """Time several functions in round-robin (A B C A B C ...), so drift of the machine hits all alike.

    Returns wall times; when ``cpu`` is a dict it also receives the process CPU time (user + system, all
    threads) of each call, which other processes competing for the cores disturb much less."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: [] for k in fns}
    if cpu is not None:
        cpu.update({k: [] for k in fns})
    for _ in range(reps):
        for k, fn in fns.items():
            c = time.process_time()
            t = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t)
            if cpu is not None:
                cpu[k].append(time.process_time() - c)
    return out


#: ``write_synthetic``'s default sizes (the demo's are 4x larger): a shorter feature-cache build per benchmark.
SMALL_CORPUS = ("data.synth_videos=40", "data.synth_vqa_images=120", "data.synth_audio_clips=48")


def demo_config(data_root: str | Path, *overrides: str, feature_cache: str | Path | None = None):
    """configs/demo.yaml with random-weight models (no pretraining), no trackers, data under ``data_root``."""
    from safe_av.config import load_config

    ov = [f"data.root={data_root}", "train.pretrain.enabled=false", "train.trackers=[]",
          f"data.feature_cache={feature_cache if feature_cache else 'null'}", *overrides]
    return load_config(DEMO, ov)


def make_trainer(cfg, out_dir: str | Path):
    """A set-up Trainer (data read, model built, cache opened) ready for ``_start_phase``."""
    from safe_av.training.loop import Trainer

    tr = Trainer(cfg, out_dir)
    tr.setup()
    tr.curriculum = tr._build_curriculum()
    tr.fisher = None
    return tr


class FixedStream:
    """Stands in for a BatchStream: returns the same collated batch every time (no loading cost)."""

    def __init__(self, batch: dict):
        self.batch = batch
        self.audio_ratio = 1.0

    def next(self) -> dict:
        return dict(self.batch)


class FusionPhaseStep:
    """The demo's phase 2 (projector + fusion train) with distillation and retention off, random weights, data in
    a temp folder, and one collated batch with image + audio in every row: ``step()`` is one
    ``Trainer._optimizer_step`` on that batch; ``step(frozen_prefix=False)`` the same with the prefix off."""

    def __init__(self, name: str, *overrides: str):
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.cfg = demo_config(self.tmp / "data", *SMALL_CORPUS, "loss.distillation=false", "loss.retention=false",
                               *overrides, feature_cache=self.tmp / "cache")
        self.tr = make_trainer(self.cfg, self.tmp / "run")
        self.phase_index = 1
        self.phase = self.cfg.train.phases[self.phase_index]
        self.optim, self.sched, self.stream, _ = self.tr._start_phase(self.phase_index)
        self.batch = audio_batch(self.stream)
        self.tr.ddp_model.train()
        self.weights = self.tr._weights(self.phase)
        assert self.weights.beta == 0 and self.weights.gamma == 0, self.weights

    def step(self, batch: dict | None = None, *, frozen_prefix: bool = True) -> None:
        model = self.tr.model
        model.frozen_prefix = frozen_prefix
        try:
            self.tr._optimizer_step(self.tr.ddp_model, self.optim, self.sched, FixedStream(batch or self.batch),
                                    self.weights)
        finally:
            model.frozen_prefix = True


def plain_model(hf):
    """A copy of a transformers model without the peft LoRA layers SAFE injected for a later phase (each replaced by
    the linear it wraps): the bare model, which pays no wrapper call per projection."""
    import copy

    plain = copy.deepcopy(hf)
    unwrap_lora(plain)
    return plain


def unwrap_lora(model) -> list:
    """In place: replace each peft LoRA layer of ``model`` by the module it wraps. Returns what
    :func:`rewrap_lora` needs to put them back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    undo = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, name, child.get_base_layer())
                undo.append((module, name, child))
    return undo


def rewrap_lora(undo: list) -> None:
    for module, name, child in undo:
        setattr(module, name, child)


def bare_step(safe, batch: dict, *, model=None, autocast=None):
    """The bare step on a collated SAFE batch: the transformers VL model's own forward (``pixel_values``,
    ``inputs_embeds``, ``attention_mask``, ``labels``; its own vision path and loss) and ``loss.backward()``, where
    the embeddings carry SAFE's audio tokens (computed once, eval mode) as constants and only those need a gradient:
    the frozen LM passing gradients back to its input tokens, no weight gradients.

    ``model``: the transformers model to run (default ``safe.base.model``; :func:`plain_model` gives one without
    idle LoRA layers). ``autocast``: a context factory (e.g. ``accelerator.autocast``). The image placeholders are
    embedded with the image token's own embedding, which is how LLaVA finds them without ``input_ids`` (it takes
    only one of the two; BLIP-2 requires ``input_ids`` and reads the positions from them). Returns ``(step, loss)``: ``loss()`` is the bare loss on the batch (no
    gradient); SAFE's own loss in eval mode agrees with it."""
    import contextlib

    hf = model if model is not None else safe.base.model
    autocast = autocast or contextlib.nullcontext
    ids = batch["input_ids"]
    audio_pos = ids == safe.audio_token_id
    was_training = safe.training
    safe.eval()
    try:
        with torch.no_grad(), autocast():
            audio_vals = safe.build_inputs(**batch)["embeds"][audio_pos]  # SAFE's audio tokens, as constants
    finally:
        safe.train(was_training)
    leaf = audio_vals.detach().clone().requires_grad_(True)  # (B*K, D): the only input that needs a gradient
    plain_ids = ids.masked_fill(audio_pos, safe.base.tokenizer.pad_token_id)
    table = hf.get_input_embeddings()
    kwargs = dict(attention_mask=batch["attention_mask"], labels=batch["labels"])
    if safe.base.family == "blip2":  # its forward requires input_ids (and takes the image positions from them)
        kwargs["input_ids"] = ids
    if batch.get("images") is not None:
        kwargs["pixel_values"] = batch["images"].to(table.weight.dtype)

    def embeds():
        emb = table(plain_ids)
        return emb.masked_scatter(audio_pos.unsqueeze(-1), leaf.to(emb.dtype))

    def step() -> None:
        with autocast():
            loss = hf(inputs_embeds=embeds(), **kwargs).loss
        loss.backward()
        leaf.grad = None

    def loss() -> float:
        with torch.no_grad(), autocast():
            return float(hf(inputs_embeds=embeds(), **kwargs).loss)

    return step, loss


def audio_batch(stream, *, need_images: bool = True, tries: int = 50) -> dict:
    """The next batch of ``stream`` in which every sample has audio (and an image)."""
    stream.configure(1.0, None)
    for _ in range(tries):
        b = stream.next()
        if b.get("empty"):
            continue
        if bool(b["has_audio"].all()) and (not need_images or bool(b["has_images"].all())):
            return b
    raise RuntimeError("no batch with audio (and images) in every row")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far: ``VmHWM`` of /proc/self/status.

    Not ``ru_maxrss``: Linux carries the parent's high-water mark at fork into a child's ``ru_maxrss``
    across exec, so a child started by a big parent reports the parent's peak (measured: a 600 MiB parent
    hid a child's whole 80 MiB growth). ``VmHWM`` belongs to the process's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tensor_peak_bytes(fn) -> tuple[float, float]:
    """(peak, net) bytes of CPU tensor allocations made while ``fn()`` runs, from torch.profiler's memory
    events (every allocation and free of torch's CPU allocator, in time order). Tensors alive before the
    call are not counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return float(peak), float(cur)


def live_tensor_bytes(module) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def run_child(script: Path, args: list[str], timeout: int = 300) -> dict:
    """Run ``python script args`` in a fresh process; it prints one JSON object as its last stdout line."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], ROOT)
    return "python " + " ".join(shlex.quote(a) for a in [rel, *sys.argv[1:]])


def _header(info: dict) -> str:
    return ("# Benchmark results\n\n"
            "Written by the scripts in `bench/` (each rewrites its own section); reproduce everything with\n"
            "`bash bench/run_all.sh` from the repository root. What each benchmark measures and how:\n"
            "`docs/benchmarks.md`.\n\n"
            f"Machine of the latest run: {info['cpu']}, {info['cores']} cores usable "
            f"(torch threads {info['threads']}); torch {info['torch']}, transformers {info['transformers']}, "
            f"Python {info['python']}.\n")


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of bench/RESULTS.md, stamped with machine, date and command."""
    info = machine()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    stamp = (f"_{info['date']} · {info['cpu']}, {info['cores']} cores, torch {info['torch']} · load average "
             f"{load} at the end · `{command_line()}`_\n\n")
    block = f"<!-- BEGIN {name} -->\n## {title}\n\n{stamp}{body.rstrip()}\n<!-- END {name} -->\n"
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    head = _header(info)
    sections = re.findall(r"<!-- BEGIN (\S+) -->\n.*?<!-- END \1 -->\n", text, flags=re.S)
    blocks = {m: re.search(rf"<!-- BEGIN {re.escape(m)} -->\n.*?<!-- END {re.escape(m)} -->\n", text,
                           flags=re.S).group(0) for m in sections}
    blocks[name] = block
    order = ["step_overhead", "frozen_prefix", "feature_cache", "distillation", "data_loading", "memory_prediction", "gpu_check"]
    names = sorted(blocks, key=lambda k: order.index(k) if k in order else len(order))
    RESULTS.write_text(head + "\n" + "\n".join(blocks[k] for k in names))


def report(name: str, title: str, body: list[str], *, write: bool) -> str:
    """Print a benchmark's section (lines joined) and, with ``write``, put it into bench/RESULTS.md."""
    text = "\n".join(body)
    print(text)
    if write:
        write_section(name, title, text)
    return text


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"
